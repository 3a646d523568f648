"""The flows' ``password`` parameter: None or a Prefect ``Secret`` block, never the password itself.

A flow parameter is stored with the deployment and with every flow run (and
shown in the UI), so a password given there in plain text would be kept in
clear by the Prefect server. The parameter may therefore only be:

* ``None``: the password comes from the environment of the process running
  the flow (``KEEPFLOW_PASSWORD``, ``KEEPFLOW_PASSWORD_FILE``,
  ``KEEPFLOW_PASSWORD_COMMAND``, a terminal; see tasks/core/passwords.py),
  or from a password already set in this process (the CLI's ``--password-file``);
* ``"secret/NAME"``: a ``Secret`` block whose value is the password, loaded
  inside the flow run and set for this process with ``passwords.use_password``.
"""

from __future__ import annotations

from keepflow.tasks.core import passwords
from keepflow.tasks.core.errors import PasswordSourceError, UsageError

PREFIX = "secret/"


def _create_hint(name: str) -> str:
    return (f"create it with `prefect block create secret` (name it {name}) or in Python with "
            f"`Secret(value=...).save({name!r})` (from prefect.blocks.system import Secret)")


def resolve_password_param(password: str | None) -> None:
    """Make the flow parameter ``password`` the password source of this process.

    None leaves the sources as they are (a password already set in this
    process, then the environment). ``"secret/NAME"`` loads that Secret block
    and sets its value with ``passwords.use_password``. Anything else is a
    UsageError that does not repeat the value given (it may be a password).
    """
    if password is None:
        return
    if not isinstance(password, str) or not password.startswith(PREFIX) or not password[len(PREFIX):]:
        raise UsageError(
            "the flow parameter `password` must name a Prefect Secret block as 'secret/NAME' "
            "(or be left empty to use KEEPFLOW_PASSWORD, KEEPFLOW_PASSWORD_FILE or "
            "KEEPFLOW_PASSWORD_COMMAND where the flow runs), so that the password never sits in "
            "deployment or flow-run parameters; the value given was not used or stored. "
            + _create_hint("NAME"))
    name = password[len(PREFIX):]

    from prefect.blocks.system import Secret
    from prefect.exceptions import ObjectNotFound

    try:
        block = Secret.load(name, _sync=True)
    except ValueError as exc:
        if isinstance(exc.__cause__, ObjectNotFound):
            raise PasswordSourceError(source=f"Secret block {name!r}",
                                      reason="no such block; " + _create_hint(name)) from None
        raise
    # The raw value, not Secret.get(): get() parses JSON, so "12345" would turn into an int
    # and '"pw"' into 'pw'. A password is exactly the string stored.
    value = block.value.get_secret_value()
    if not isinstance(value, str):
        raise PasswordSourceError(source=f"Secret block {name!r}",
                                  reason=f"the block holds a {type(value).__name__}, not a string")
    if not value:
        raise PasswordSourceError(source=f"Secret block {name!r}", reason="the block's value is empty")
    passwords.use_password(value)
