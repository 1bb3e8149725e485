"""Credentials in URLs (s3://KEY:SECRET@bucket/x, https://user:token@host/x, presigned ?X-Amz-Signature=...) are
used to reach storage but never written or logged: storage.redact_url is the one definition, and a build, a
training run, an evaluation and an export write no byte of a secret anywhere (issue 24)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile

import pytest

from molscale.datasets.shards.storage import (
    get_fs,
    redact,
    redact_text,
    redact_url,
    redact_urls,
    url_credentials,
)
from tests.support import ROOT, cpu_env

# --- the redaction itself ------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("s3://AKIAKEY:se%2Fcret@bucket/qm9", "s3://***@bucket/qm9"),
    ("https://alice:tok-123@data.example.org:8443/qm9/", "https://***@data.example.org:8443/qm9/"),
    ("https://tok-only@host/x", "https://***@host/x"),
    ("https://user:p@ss@host/x?a=1", "https://***@host/x?a=1"),  # an unencoded @ in the password
    ("https://host/x.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101%2Fus-east-1"
     "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoG"
     "&X-Amz-Signature=abc123#frag",
     "https://host/x.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=20260101T000000Z"
     "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=***&X-Amz-Signature=***#frag"),
    ("https://acct.blob.core.windows.net/c/x?sv=2022&sp=r&sig=SAS%2Bsig", "https://acct.blob.core.windows.net/c/x"
     "?sv=2022&sp=r&sig=***"),
    ("https://h/x?token=t&access_token=a&password=p&secret=s&key=k&AWSAccessKeyId=A&Signature=S&versionId=7",
     "https://h/x?token=***&access_token=***&password=***&secret=***&key=***&AWSAccessKeyId=***&Signature=***"
     "&versionId=7"),
    ("s3://bucket/qm9?versionId=3", "s3://bucket/qm9?versionId=3"),   # nothing secret: unchanged
    ("s3://bucket/models@v2/x", "s3://bucket/models@v2/x"),           # an @ in the path is not userinfo
    ("data/qm9-smoke", "data/qm9-smoke"),
    ("/abs/path/with@sign", "/abs/path/with@sign"),
    ("", ""),
])
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert redact_url(shown) == shown  # idempotent: a redacted URL stays as it is


def test_redact_text_and_nested_values():
    line = ("python -m datasets build qm9 --out 's3://K:S@b/qm9' --set data.url=https://u:T@h/x?sig=Z, "
            "then \"http://h/y?token=Q\" (ok)")
    assert redact_text(line) == ("python -m datasets build qm9 --out 's3://***@b/qm9' "
                                 "--set data.url=https://***@h/x?sig=***, then \"http://h/y?token=***\" (ok)")
    assert redact_text("no url at all: key=secret") == "no url at all: key=secret"
    value = {"a": ["s3://K:S@b/x", ("https://u:p@h/",)], "n": 1.5, "s3://K:S@b": None}
    assert redact_urls(value) == {"a": ["s3://***@b/x", ("https://***@h/",)], "n": 1.5, "s3://***@b": None}
    # storage options: credential-named keys by name, URLs among the values by redact_url
    options = {"key": "K", "endpoint_url": "https://minio:pw@minio.local:9000", "client_kwargs": {"region_name": "x"}}
    assert redact(options) == {"key": "***", "endpoint_url": "https://***@minio.local:9000",
                               "client_kwargs": {"region_name": "x"}}


def test_url_credentials_are_taken_from_s3_urls_only():
    assert url_credentials("s3://AKIA:se%2Fcr%2Bet@bucket/x") == ("s3://bucket/x", {"key": "AKIA",
                                                                                     "secret": "se/cr+et"})
    assert url_credentials("s3://***@bucket/x") == ("s3://bucket/x", {})  # a redacted URL: credentials elsewhere
    assert url_credentials("https://u:t@host/x") == ("https://u:t@host/x", {})  # aiohttp's basic auth
    assert url_credentials("https://***@host/x") == ("https://host/x", {})
    assert url_credentials("s3://bucket/x") == ("s3://bucket/x", {})
    assert url_credentials("data/qm9") == ("data/qm9", {})


def test_config_written_and_logged_without_url_credentials(tmp_path):
    from molscale.trainer.train.config import load_config
    url = "s3://AKIAKEY:topsecret@bucket/qm9"
    cfg = load_config(os.path.join(ROOT, "cluster", "cpu_smoke.json"),
                      [f"data.url={url}", "storage.endpoint_url=https://u:pw@minio:9000", "storage.secret=S2"])
    assert cfg.data.url == url  # the run itself keeps the real URL
    written = cfg.to_dict()
    assert written["data"]["url"] == "s3://***@bucket/qm9"
    assert written["storage"] == {"endpoint_url": "https://***@minio:9000", "secret": "***"}
    assert "topsecret" not in json.dumps(written) and "pw@" not in json.dumps(written)
    assert cfg.to_dict(redacted=False)["data"]["url"] == url


def test_log_records_are_redacted(caplog):
    log = logging.getLogger("molscale.test_url_secrets")
    with caplog.at_level(logging.INFO):
        log.info("reading %s", "s3://AKIAKEY:topsecret@bucket/qm9")
        log.warning("https://u:tok@h/x?sig=abc failed: %d%%", 3)
        try:
            raise OSError("cannot open https://u:tok2@h/y")
        except OSError:
            log.exception("failed")
    text = caplog.text
    assert "topsecret" not in text and "tok@" not in text and "sig=abc" not in text and "tok2" not in text
    assert "s3://***@bucket/qm9" in text and "https://***@h/x?sig=*** failed: 3%" in text
    assert "https://***@h/y" in text


def test_s3_url_with_credentials_reads_and_writes(s3, monkeypatch):
    """s3://KEY:SECRET@bucket/x reaches the bucket with those credentials (none in the environment)."""
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    fs, path = get_fs("s3://AKIAKEY:se%2Fcret@test-bucket/url-creds/x.txt")
    assert path == "test-bucket/url-creds/x.txt"
    fs.pipe_file(path, b"hello")
    assert fs.cat_file(path) == b"hello"
    assert fs.key == "AKIAKEY" and fs.secret == "se/cret"


# --- a build, a training run, an evaluation and an export write no secret ----------------------------------------

KEY, SECRET, TOKEN = "AKIAURLKEY5X8Z3Q", "url-secret/9f8e7d6c5b4a", "tok-7c6b5a4f3e2d1c0b"
# what must appear nowhere: each secret, the S3 one also as it is written in a URL (percent-encoded)
NEEDLES = [KEY, SECRET, SECRET.replace("/", "%2F"), "9f8e7d6c5b4a", TOKEN]


def _leaks(paths) -> dict:
    found = {}
    for path in paths:
        data = open(path, "rb").read()
        hits = [n for n in NEEDLES if n.encode() in data]
        if hits:
            found[path] = hits
    return found


def _files(*folders) -> list[str]:
    """Every regular file under ``folders`` (not Ray's sockets)."""
    paths = [os.path.join(d, name) for folder in folders for d, _, names in os.walk(folder) for name in names]
    return [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]


@pytest.fixture
def ray_tmp():
    """Ray's session folder, so that its logs are searched too (a short path: Ray's socket path limit)."""
    import shutil
    folder = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_build_train_evaluate_export_write_no_url_secret(s3, tmp_path, ray_tmp):
    prefix = "test-bucket/qm9-url-secrets"
    s3_url = f"s3://{KEY}:{SECRET.replace('/', '%2F')}@{prefix}"           # read and written with these
    http_url = f"http://reader:{TOKEN}@127.0.0.1:{s3.port}/{prefix}"       # the same files over https-style basic auth
    env = cpu_env(RAY_TMPDIR=ray_tmp, AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
                  AWS_EC2_METADATA_DISABLED="true")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # only the URL's credentials
        env.pop(name, None)
    outputs = []

    def run(*args):
        r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-3000:]
        outputs.append((args[:2], r.stdout + r.stderr))
        return r

    run("-m", "datasets", "build", "qm9", "--limit", "300", "--shard-size", "50", "--workers", "1",
        "--no-progress", "--out", s3_url)
    run_dir, eval_dir, export = tmp_path / "run", tmp_path / "eval", tmp_path / "export" / "m.safetensors"
    run("trainer/main.py", "--config", "cluster/cpu_smoke.json", "--run-dir", str(run_dir), "--max-steps", "2",
        "--set", f"data.url={s3_url}", "--set", "checkpoint.every_steps=2", "--set", "evaluation.every_steps=2",
        "--set", "logging.progress_bar=false")
    assert (run_dir / "step00000002" / "complete").exists()  # the URL's credentials did reach the shards
    run("evals/generate.py", "--checkpoint", str(run_dir), "--n-samples", "8", "--batch", "4", "--steps", "5",
        "--num-cpus", "2", "--reference", http_url, "--out", str(eval_dir))
    run("-m", "trainer.export", str(run_dir), "--out", str(export))

    # every object of the dataset (manifest, shards, the evaluation's reference caches), read with the env's keys
    import boto3
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing")
    objects = client.list_objects_v2(Bucket="test-bucket", Prefix="qm9-url-secrets/")["Contents"]
    stored = tmp_path / "stored"
    stored.mkdir()
    for obj in objects:
        local = stored / obj["Key"].replace("/", "__")
        local.write_bytes(client.get_object(Bucket="test-bucket", Key=obj["Key"])["Body"].read())

    written = _files(run_dir, eval_dir, export.parent, stored, ray_tmp)
    assert any("/wandb/" in p for p in written if p.startswith(str(run_dir)))       # W&B's files are included
    assert any("/wandb/" in p for p in written if p.startswith(str(eval_dir)))
    assert any(p.endswith(".pt") for p in written) and any(p.endswith("manifest.json") for p in written)
    leaks = _leaks(written)
    assert not leaks, f"secrets written to {leaks}"
    for what, text in outputs:  # the processes' own output (console logs)
        hits = [n for n in NEEDLES if n in text]
        assert not hits, f"{what} printed {hits}"

    # ... and the URLs were written, in their redacted form
    shown_s3, shown_http = f"s3://***@{prefix}", f"http://***@127.0.0.1:{s3.port}/{prefix}"
    manifest = json.loads((stored / "qm9-url-secrets__manifest.json").read_text())
    assert shown_s3 in manifest["command"]
    assert json.loads((run_dir / "config.json").read_text())["data"]["url"] == shown_s3
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["reference"]["dataset"] == shown_http and metrics["novelty"] is not None
    assert shown_http in (eval_dir / "report.html").read_text()
    card = json.loads(export.with_name("m.safetensors.json").read_text())
    assert card["dataset"]["url"] == shown_s3
    wandb_files = [p for p in written if "/wandb/" in p and p.startswith(str(run_dir))]
    assert any(shown_s3.encode() in open(p, "rb").read() for p in wandb_files)  # the W&B config and command line
