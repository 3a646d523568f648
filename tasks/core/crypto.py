"""Format 2's cryptography: subkeys, file keys, sealed files and key files.

Everything here follows ARCHITECTURE.md, "Repository format 2
(specification)": this module is the code of its "Conventions", "Keys and
passwords", "Nonces can never repeat" and "Ids" sections, and nothing else in
keepflow calls ``cryptography`` directly.

* ``Subkeys``: the per-purpose keys derived from the master key ``M`` with
  HKDF-SHA256 (one per file kind, the PRF key for deterministic salts, the
  two BLAKE3 id keys and the chunker key).
* ``file_key``: ``HKDF(K_kind, salt, magic)``, the key a single file's messages
  are encrypted under; message ``i`` uses nonce ``N(i)``.
* ``seal`` / ``unseal``: the one-message files (index files, leases, trash
  marks): ``AEAD(K_f, N(0), plaintext, magic) || salt || magic``.
* key files: ``make_key_file`` wraps ``M`` under a password-derived key
  (Argon2id, or scrypt where OpenSSL lacks it); ``unwrap_key_file`` opens one.

With ``encryption: none`` the master key is 32 zero bytes (``ZERO_KEY``): ids
and cut points stay well defined, and nothing is encrypted.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_SIZE = 32
SALT_SIZE = 32
TAG_SIZE = 16
NONCE_SIZE = 12
ZERO_KEY = bytes(KEY_SIZE)
N_LAST = b"\xff" * NONCE_SIZE

# File kinds: the 8-byte magic that ends the file, tags its key and is its AAD.
PACK = b"KFPACK02"
INDEX = b"KFINDX02"
SNAPSHOT = b"KFSNAP02"
TRASH = b"KFTRSH02"
LEASE = b"KFLOCK02"
CONFIG = b"KFCONF02"

# Argon2id t=4, m=128 MiB, p=4: about half a second here (bench/RESULTS.md, "Format 2 choices").
ARGON2_DEFAULTS = {"t": 4, "m": 131072, "p": 4}
SCRYPT_DEFAULTS = {"n": 2 ** 17, "r": 8, "p": 1}
KEY_FILE_VERSION = 1


class AuthenticationFailed(Exception):
    """A tag did not verify: the bytes were changed, or the key is not this file's."""


def nonce(i: int) -> bytes:
    """``N(i)``: the 12-byte big-endian nonce holding ``i``."""
    return i.to_bytes(NONCE_SIZE, "big")


def canon(obj: Any) -> bytes:
    """The byte form of JSON wherever it is authenticated."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), KEY_SIZE, salt, info).derive(ikm)


def b3k(key: bytes, data: bytes | memoryview = b"", length: int = 32) -> bytes:
    """Keyed BLAKE3 of ``data`` (``length`` bytes of its extendable output)."""
    return blake3.blake3(data, key=key).digest(length=length)


@dataclass(frozen=True)
class Subkeys:
    """The keys derived from the master key, one per purpose (never one key for two kinds of data)."""

    pack: bytes
    index: bytes
    snapshot: bytes
    trash: bytes
    lease: bytes
    config: bytes
    salt: bytes
    data_id_key: bytes
    list_id_key: bytes
    chunker: bytes
    encrypted: bool

    @classmethod
    def derive(cls, master: bytes, repo_id: str, encrypted: bool = True) -> Subkeys:
        idbytes = bytes.fromhex(repo_id)

        def sub(purpose: str) -> bytes:
            return hkdf(master, idbytes, f"keepflow 2 {purpose}".encode("ascii"))

        return cls(pack=sub("pack"), index=sub("index"), snapshot=sub("snapshot"), trash=sub("trash"),
                   lease=sub("lease"), config=sub("config"), salt=sub("salt"), data_id_key=sub("data id"),
                   list_id_key=sub("list id"), chunker=sub("chunker"), encrypted=encrypted)

    def kind_key(self, magic: bytes) -> bytes:
        return self._kind_keys[magic]

    @cached_property
    def _kind_keys(self) -> dict[bytes, bytes]:
        # Built once (restore and verify ask for the pack key once per blob).
        return {PACK: self.pack, INDEX: self.index, SNAPSHOT: self.snapshot, TRASH: self.trash,
                LEASE: self.lease, CONFIG: self.config}

    def deterministic_salt(self, magic: bytes, *parts: bytes | bytearray | memoryview) -> bytes:
        """``B3K(K_salt, magic || parts...)``: the salt of a write-once file (SIV: no RNG involved)."""
        h = self.salt_hasher(magic)
        for p in parts:
            h.update(p)
        return h.digest()

    def salt_hasher(self, magic: bytes) -> Any:
        """``deterministic_salt``'s keyed hash before the parts: ``update`` it with them
        in order, then ``digest()``, for files too large to hold whole."""
        return blake3.blake3(magic, key=self.salt)

    def cipher(self, magic: bytes, salt: bytes) -> AESGCM:
        """The AEAD of one file: its key is ``HKDF(K_kind, salt, magic)``."""
        return _cipher(self.kind_key(magic), salt, magic)

    def blob_id(self, data: bytes | memoryview) -> str:
        """A data blob's id (a small file's content or one chunk), as hex."""
        return blake3.blake3(data, key=self.data_id_key, max_threads=blake3.blake3.AUTO
                             if len(data) >= 8 << 20 else 1).hexdigest()

    def list_id(self, data: bytes) -> str:
        return blake3.blake3(data, key=self.list_id_key).hexdigest()


@lru_cache(maxsize=4096)
def _cipher(kind_key: bytes, salt: bytes, magic: bytes) -> AESGCM:
    # Cached: restore and verify open many blobs of the same pack one by one.
    return AESGCM(hkdf(kind_key, salt, magic))


def stream_encryptor(keys: Subkeys, magic: bytes, salt: bytes, i: int) -> Any:
    """``AEAD(K_f, N(i), plaintext, magic)`` of a message too large to hold twice in memory:
    ``update`` it chunk by chunk, then ``finalize()`` and append ``.tag``. The bytes
    are exactly ``encrypt``'s (AES-256-GCM is a stream cipher plus a tag), so the
    files it writes are the format's, whichever way they were made."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    enc = Cipher(algorithms.AES(hkdf(keys.kind_key(magic), salt, magic)), modes.GCM(nonce(i))).encryptor()
    enc.authenticate_additional_data(magic)
    return enc


def stream_decryptor(keys: Subkeys, magic: bytes, salt: bytes, i: int) -> Any:
    """The reverse of ``stream_encryptor``: ``update`` the ciphertext (without its
    tag), then ``finalize_with_tag(tag)``, which raises ``InvalidTag`` when the
    message does not authenticate. Nothing ``update`` returns may be trusted
    (parsed, decompressed, written under a real name) before that call returns."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    dec = Cipher(algorithms.AES(hkdf(keys.kind_key(magic), salt, magic)), modes.GCM(nonce(i))).decryptor()
    dec.authenticate_additional_data(magic)
    return dec


def finish_decrypt(dec: Any, tag: bytes) -> bytes:
    """The last plaintext bytes of a ``stream_decryptor``; AuthenticationFailed when the tag is wrong."""
    try:
        return dec.finalize_with_tag(tag)
    except InvalidTag:
        raise AuthenticationFailed() from None


# cryptography's AEADs take any buffer (bytes, bytearray, memoryview) and read it in
# place: a memoryview payload (a chunk of the chunker's window, a blob inside a
# pack span) is neither copied on the way in nor out.

def encrypt(cipher: AESGCM, i: int, plaintext: bytes | bytearray | memoryview, aad: bytes) -> bytes:
    return cipher.encrypt(nonce(i), plaintext, aad)


def decrypt(cipher: AESGCM, i: int, ciphertext: bytes | memoryview, aad: bytes, *,
            nonce_bytes: bytes | None = None) -> bytes:
    try:
        return cipher.decrypt(nonce_bytes or nonce(i), ciphertext, aad)
    except InvalidTag:
        raise AuthenticationFailed() from None


# -- one-message files: index files, leases, trash marks ------------------------------------------

def seal(keys: Subkeys, magic: bytes, plaintext: bytes, *, random_salt: bool = False) -> bytes:
    """``AEAD(K_f, N(0), plaintext, magic) || salt || magic``.

    Write-once files take the deterministic salt (identical plaintexts give
    identical files); files replaced in place (leases) take a random one.
    """
    salt = os.urandom(SALT_SIZE) if random_salt else keys.deterministic_salt(magic, plaintext)
    return encrypt(keys.cipher(magic, salt), 0, plaintext, magic) + salt + magic


def unseal(keys: Subkeys, magic: bytes, data: bytes) -> bytes:
    """The plaintext of a sealed file; raises AuthenticationFailed for anything else."""
    if len(data) < TAG_SIZE + SALT_SIZE + len(magic) or data[-len(magic):] != magic:
        raise AuthenticationFailed()
    salt = data[-len(magic) - SALT_SIZE: -len(magic)]
    return decrypt(keys.cipher(magic, salt), 0, data[: -len(magic) - SALT_SIZE], magic)


# -- keepflow.json's config -------------------------------------------------------------------

def seal_config(keys: Subkeys, plain: dict, fields: dict) -> str:
    """``b64(salt || AEAD(K_f, N(0), canon(fields), "KFCONF02" || canon(plain)))``, a random salt per write."""
    salt = os.urandom(SALT_SIZE)
    body = encrypt(keys.cipher(CONFIG, salt), 0, canon(fields), CONFIG + canon(plain))
    return base64.b64encode(salt + body).decode("ascii")


def unseal_config(keys: Subkeys, plain: dict, sealed: str) -> dict:
    try:
        raw = base64.b64decode(sealed, validate=True)
    except ValueError:
        raise AuthenticationFailed() from None
    if len(raw) < SALT_SIZE + TAG_SIZE:
        raise AuthenticationFailed()
    salt, body = raw[:SALT_SIZE], raw[SALT_SIZE:]
    return json.loads(decrypt(keys.cipher(CONFIG, salt), 0, body, CONFIG + canon(plain)))


# -- key files ------------------------------------------------------------------------------------

def new_master_key() -> bytes:
    return os.urandom(KEY_SIZE)


def argon2_available() -> bool:
    try:
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id  # noqa: F401
    except ImportError:
        return False
    try:
        _derive({"kdf": "argon2id", "t": 1, "m": 8, "p": 1}, b"x", bytes(SALT_SIZE))
    except Exception:   # UnsupportedAlgorithm: this OpenSSL has no Argon2
        return False
    return True


def _derive(params: dict, password: bytes, salt: bytes) -> bytes:
    if params["kdf"] == "argon2id":
        from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

        return Argon2id(salt=salt, length=KEY_SIZE, iterations=int(params["t"]), lanes=int(params["p"]),
                        memory_cost=int(params["m"])).derive(password)
    if params["kdf"] == "scrypt":
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=KEY_SIZE, n=int(params["n"]), r=int(params["r"]),
                      p=int(params["p"])).derive(password)
    raise ValueError(f"unknown kdf {params['kdf']!r}")


def default_kdf() -> dict:
    if argon2_available():
        return {"kdf": "argon2id", **ARGON2_DEFAULTS}
    return {"kdf": "scrypt", **SCRYPT_DEFAULTS}


def make_key_file(master: bytes, repo_id: str, password: str, kdf: dict | None = None) -> bytes:
    """A new key file's bytes: ``master`` wrapped under a key derived from ``password``.

    ``kdf`` overrides the parameters (tests use cheap ones through
    ``KEEPFLOW_KDF``; see keyfiles.kdf_params); every parameter is recorded and
    authenticated, so a reader needs nothing but the file and the password.
    """
    params = dict(kdf or default_kdf())
    body = {"version": KEY_FILE_VERSION, "repository": repo_id, **params,
            "salt": base64.b64encode(os.urandom(SALT_SIZE)).decode("ascii"),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    kek = _derive(params, password.encode("utf-8"), base64.b64decode(body["salt"]))
    wrapped = AESGCM(kek).encrypt(nonce(0), master, canon(body))
    body["wrapped"] = base64.b64encode(wrapped).decode("ascii")
    return (json.dumps(body, indent=2, sort_keys=True) + "\n").encode("ascii")


def parse_key_file(data: bytes) -> dict:
    """The key file's JSON; raises ValueError when it is not a key file."""
    body = json.loads(data)
    if not isinstance(body, dict) or body.get("version") != KEY_FILE_VERSION or "wrapped" not in body \
            or body.get("kdf") not in ("argon2id", "scrypt") or "salt" not in body:
        raise ValueError("not a keepflow key file")
    return body


def unwrap_key_file(data: bytes, password: str, repo_id: str) -> bytes | None:
    """The master key, or None when ``password`` does not open this key file.

    Raises ValueError for a file that is not a key file (damaged, not a wrong password).
    """
    body = parse_key_file(data)
    if body.get("repository") != repo_id:
        return None     # transplanted from another repository: it cannot open this one
    params = {k: v for k, v in body.items() if k != "wrapped"}
    kek = _derive(params, password.encode("utf-8"), base64.b64decode(body["salt"]))
    try:
        master = AESGCM(kek).decrypt(nonce(0), base64.b64decode(body["wrapped"]), canon(params))
    except InvalidTag:
        return None
    return master if len(master) == KEY_SIZE else None
