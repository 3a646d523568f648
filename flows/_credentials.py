"""Storage options that may come from Prefect blocks.

Every flow's ``storage_options`` (and each value of ``replica_options``) may
be a dict of fsspec options, or a string naming a block, so that deployments
keep secrets out of their parameters:

* ``"secret/NAME"``: a ``Secret`` block whose value is a JSON object of
  fsspec options;
* ``"aws-credentials/NAME"``: a prefect-aws ``AwsCredentials`` block (needs
  ``pip install prefect-aws``), turned into s3fs options (key, secret, token,
  region, endpoint).

The block is loaded inside the flow run; the secret values are passed to the
tasks as arguments, which Prefect does not store.
"""

from __future__ import annotations

import json

from keepflow.tasks.core.errors import UsageError


def resolve(value):
    """dict -> itself; ``"kind/name"`` -> options loaded from that block; None -> None."""
    if value is None or isinstance(value, dict):
        return value
    if not isinstance(value, str) or "/" not in value:
        raise UsageError(f"storage options must be a JSON object or a block reference such as "
                         f"'secret/NAME' or 'aws-credentials/NAME', not {value!r}")
    kind, name = value.split("/", 1)
    if kind == "secret":
        from prefect.blocks.system import Secret

        raw = Secret.load(name, _sync=True).get()
        options = json.loads(raw) if isinstance(raw, str) else raw
        if not isinstance(options, dict):
            raise UsageError(f"Secret block {name!r} must hold a JSON object of storage options")
        return options
    if kind == "aws-credentials":
        try:
            from prefect_aws import AwsCredentials
        except ImportError:
            raise UsageError("aws-credentials blocks need prefect-aws: pip install 'keepflow[aws]'") from None
        creds = AwsCredentials.load(name, _sync=True)
        options = {"key": creds.aws_access_key_id,
                   "secret": creds.aws_secret_access_key.get_secret_value() if creds.aws_secret_access_key else None,
                   "token": creds.aws_session_token}
        client_kwargs = {}
        if creds.region_name:
            client_kwargs["region_name"] = creds.region_name
        endpoint = getattr(getattr(creds, "aws_client_parameters", None), "endpoint_url", None)
        if endpoint:
            client_kwargs["endpoint_url"] = endpoint
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return {k: v for k, v in options.items() if v is not None}
    raise UsageError(f"unknown block kind {kind!r} in {value!r}; use 'secret/NAME' or 'aws-credentials/NAME'")


def resolve_map(mapping):
    """``replica_options``: URL -> options or block reference."""
    return {url: resolve(v) for url, v in (mapping or {}).items()}
