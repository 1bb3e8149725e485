"""W&B settings shared by training and evaluation: the mode and the project/entity/group of a run.

Precedence everywhere: an explicit value (config, command line) > what wandb itself reads (WANDB_* environment
variables, the settings files `wandb offline` / `wandb init` write) > our default. The only thing we decide
instead of wandb: a machine with no W&B credentials at all runs offline, where wandb would prompt or fail.
"""

from __future__ import annotations

import contextlib
import sys


def wandb_settings():
    """The settings ``wandb.init`` will use in this process (environment and settings files, read once)."""
    from wandb.sdk import wandb_setup
    return wandb_setup.singleton().settings


def has_credentials(settings=None) -> bool:
    """An API key in WANDB_API_KEY or the netrc wandb reads, an identity token file, or a login in this process."""
    s = settings or wandb_settings()
    try:  # wandb's own lookup (wandb 0.31's internal module; the fallback below covers other versions)
        from wandb.sdk.lib import wbauth
        host = wbauth.HostUrl(s.base_url, app_url=s.app_url)
        return bool(s.api_key or s.identity_token_file or wbauth.session_credentials(host=host)
                    or wbauth.read_netrc_auth(host=host))
    except (ImportError, AttributeError, TypeError):
        import netrc
        from urllib.parse import urlparse
        try:
            in_netrc = netrc.netrc().authenticators(urlparse(s.base_url).hostname or "") is not None
        except (OSError, netrc.NetrcParseError):
            in_netrc = False
        return bool(s.api_key or in_netrc)


def resolve_mode(configured: str | None = None) -> str | None:
    """The ``mode`` for ``wandb.init``: None lets wandb decide; "offline" on a machine without credentials."""
    if configured:
        return configured
    s = wandb_settings()
    if "mode" in s.model_fields_set or has_credentials(s):  # WANDB_MODE or a settings file chose; or logged in
        return None
    return "offline"


def resolve_target(project: str | None, entity: str | None, group: str | None, default_project: str,
                   fallback: dict | None = None) -> dict:
    """project/entity/group for ``wandb.init``: the explicit value, else wandb's (WANDB_PROJECT, WANDB_ENTITY,
    WANDB_RUN_GROUP), else ``fallback``'s (an evaluation's training run), else the default."""
    s, fallback = wandb_settings(), fallback or {}
    return {"project": project or s.project or fallback.get("project") or default_project,
            "entity": entity or s.entity or fallback.get("entity"),
            "group": group or s.run_group or fallback.get("group")}


def identity(run) -> dict:
    """What a checkpoint stores so that an evaluation can join this run's project and group."""
    mode = "offline" if run.offline else ("disabled" if run.disabled else "online")
    return {"entity": run.entity or None, "project": run.project, "id": run.id, "group": run.group or None,
            "name": run.name, "mode": mode}


@contextlib.contextmanager
def redacted_argv():
    """sys.argv with the credentials in its URLs redacted, for the duration of ``wandb.init``: W&B records the
    command line (its run metadata, ``args``), and ``--set data.url=s3://KEY:SECRET@bucket/x`` or
    ``--reference https://user:token@host/x`` must not reach it. The process's own argv is restored after."""
    from molscale.datasets.shards.storage import redact_text
    saved = sys.argv
    sys.argv = [redact_text(arg) for arg in saved]
    try:
        yield
    finally:
        sys.argv = saved
