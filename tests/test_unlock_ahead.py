"""keyring.unlock_ahead: the KDF runs on a background thread while a command imports Prefect.

What must hold: the key derived ahead is the one the command then uses (one
KDF run in all, even when the command asks while the thread is still
deriving), and nothing about a missing, wrong or absent password changes:
those are still reported by the command's own unlock.
"""

from __future__ import annotations

import pytest

from keepflow.tasks.core import crypto, keyring, passwords
from keepflow.tasks.core.errors import WrongPasswordError
from keepflow.tasks.core.repository import RepoConfig, Repository

from tests.conftest import TEST_PASSWORD

# A KDF slow enough (~0.1-0.3 s here) that the command asks while the thread is still deriving.
SLOW_KDF = "argon2id:t=3,m=65536,p=1"


@pytest.fixture
def derivations(monkeypatch):
    """Count real KDF runs (crypto._derive is the one place a password is stretched)."""
    calls = []
    real = crypto._derive

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(crypto, "_derive", counted)
    keyring.forget()
    passwords.clear()
    yield calls
    keyring.forget()
    passwords.clear()


def _repo(tmp_path, monkeypatch, kdf=None):
    if kdf:
        monkeypatch.setenv("KEEPFLOW_KDF", kdf)
    url = str(tmp_path / "repo")
    Repository.init(url, password=TEST_PASSWORD)
    keyring.forget()
    return url


def test_the_key_derived_ahead_is_used_and_derived_once(tmp_path, monkeypatch, derivations):
    url = _repo(tmp_path, monkeypatch)
    derivations.clear()
    thread = keyring.unlock_ahead(url)
    assert thread is not None
    thread.join(timeout=60)
    assert len(derivations) == 1
    repo = Repository.open(url)                     # what the flow does: no second derivation
    assert len(derivations) == 1
    assert repo.keys.blob_id(b"x") == Repository.open(url).keys.blob_id(b"x")


def test_a_command_asking_while_the_thread_derives_waits_for_it(tmp_path, monkeypatch, derivations):
    url = _repo(tmp_path, monkeypatch, kdf=SLOW_KDF)
    derivations.clear()
    thread = keyring.unlock_ahead(url)
    repo = Repository.open(url)                     # asks at once, while the thread is deriving
    thread.join(timeout=60)
    assert len(derivations) == 1
    assert repo.encrypted and repo.keys is not None


def test_a_wrong_password_is_still_the_commands_own_error(tmp_path, monkeypatch, derivations):
    url = _repo(tmp_path, monkeypatch)
    monkeypatch.setenv("KEEPFLOW_PASSWORD", "not the password")
    keyring.unlock_ahead(url).join(timeout=60)      # derives, opens no key file, fails quietly
    with pytest.raises(WrongPasswordError):
        Repository.open(url)


def test_no_password_source_never_prompts_from_the_thread(tmp_path, monkeypatch, derivations):
    url = _repo(tmp_path, monkeypatch)
    monkeypatch.delenv("KEEPFLOW_PASSWORD")
    monkeypatch.setattr(passwords, "_stdin_is_a_tty", lambda: True)   # a terminal is there ...
    prompted = []
    monkeypatch.setattr(passwords, "_prompt", lambda *a: prompted.append(a) or TEST_PASSWORD)
    derivations.clear()
    assert keyring.unlock_ahead(url) is None
    assert prompted == [] and derivations == []      # ... but only the command itself may ask
    Repository.open(url)
    assert len(prompted) == 1 and len(derivations) == 1


@pytest.mark.parametrize("kind", ["missing", "plaintext", "format 1"])
def test_nothing_to_unlock_is_left_alone(tmp_path, derivations, kind):
    url = str(tmp_path / "repo")
    if kind == "plaintext":
        Repository.init(url, config=RepoConfig.new_v2(encryption="none"))
    elif kind == "format 1":
        Repository.init(url, config=RepoConfig())
    derivations.clear()
    assert keyring.unlock_ahead(url) is None
    assert derivations == [] and keyring._pending == {}
