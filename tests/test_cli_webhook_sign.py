"""``langorch webhook sign``: the headers it prints are the HMAC-SHA256 a sender computes (checked with ``hmac``
directly, with the gateway's verifier, and with the docs' ``openssl`` recipe), its curl line, and its usage
errors."""

from __future__ import annotations

import hashlib
import hmac
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ckp_core.webhook_signing import verify_signature
from langorch.cli import app

pytestmark = pytest.mark.unit

runner = CliRunner()
SECRET = "s3cret-for-tests"
BODY = b'{"order_id": "A-17"}\n'
TS = 1_767_225_600


def hexmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def headers_of(output: str) -> dict[str, str]:
    out = {}
    for line in output.splitlines():
        if line.startswith("X-LangOrch-"):
            name, _, value = line.partition(": ")
            out[name] = value
    return out


@pytest.fixture
def body_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.json"
    path.write_bytes(BODY)
    return path


def test_timestamped_signature_from_env(body_file: Path) -> None:
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "HOOK_SECRET", "--timestamp", str(TS),
                                 str(body_file)], env={"HOOK_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"X-LangOrch-Timestamp: {TS}",
        f"X-LangOrch-Signature: sha256={hexmac(SECRET, f'{TS}.'.encode() + BODY)}",
    ]
    headers = headers_of(result.stdout)
    assert verify_signature(SECRET, BODY, headers, now=lambda: TS + 5).ok


def test_default_timestamp_is_now(body_file: Path) -> None:
    before = int(time.time())
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "HOOK_SECRET", str(body_file)],
                           env={"HOOK_SECRET": SECRET})
    after = int(time.time())
    assert result.exit_code == 0, result.output
    headers = headers_of(result.stdout)
    assert before <= int(headers["X-LangOrch-Timestamp"]) <= after
    assert verify_signature(SECRET, BODY, headers).ok


def test_body_scheme_and_secret_file(tmp_path: Path, body_file: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")  # the trailing newline is not part of the secret
    result = runner.invoke(app, ["webhook", "sign", "--secret-file", str(secret_file), "--scheme", "body",
                                 str(body_file)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"X-LangOrch-Signature: sha256={hexmac(SECRET, BODY)}"]
    assert verify_signature(SECRET, BODY, headers_of(result.stdout), scheme="body").ok


def test_body_from_stdin() -> None:
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "HOOK_SECRET", "--timestamp", str(TS), "-"],
                           env={"HOOK_SECRET": SECRET}, input=BODY)
    assert result.exit_code == 0, result.output
    assert headers_of(result.stdout)["X-LangOrch-Signature"] == "sha256=" + hexmac(SECRET, f"{TS}.".encode() + BODY)


def test_several_secrets_for_rotation(tmp_path: Path, body_file: Path) -> None:
    new_file = tmp_path / "new"
    new_file.write_text("new-secret")
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "OLD", "--secret-file", str(new_file),
                                 "--timestamp", str(TS), str(body_file)], env={"OLD": "old-secret"})
    assert result.exit_code == 0, result.output
    msg = f"{TS}.".encode() + BODY
    signature = headers_of(result.stdout)["X-LangOrch-Signature"]
    assert signature == f"sha256={hexmac('old-secret', msg)},sha256={hexmac('new-secret', msg)}"
    for secret in ("old-secret", "new-secret"):
        assert verify_signature(secret, BODY, headers_of(result.stdout), now=lambda: TS).ok


def test_curl_line_posts_the_exact_body(body_file: Path) -> None:
    url = "http://127.0.0.1:8080/api/triggers/webhook/order_intake"
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "HOOK_SECRET", "--timestamp", str(TS),
                                 "--url", url, str(body_file)], env={"HOOK_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    curl = result.stdout.splitlines()[-1]
    signature = "sha256=" + hexmac(SECRET, f"{TS}.".encode() + BODY)
    assert shlex.split(curl) == [
        "curl", "-sS", "-X", "POST", url, "-H", "Content-Type: application/json",
        "-H", f"X-LangOrch-Timestamp: {TS}", "-H", f"X-LangOrch-Signature: {signature}",
        "--data-binary", f"@{body_file}"]
    assert "valid for a few minutes" in result.stderr


def test_the_docs_openssl_recipe_gives_the_same_signature(tmp_path: Path) -> None:
    # the SIG= line of the curl + openssl recipe in docs/operations/webhooks-signing.md, run as written
    page = (Path(__file__).parents[1] / "docs" / "operations" / "webhooks-signing.md").read_text()
    recipe = [line for line in page.splitlines() if line.startswith("SIG=$( (printf")]
    assert len(recipe) == 1, recipe
    (tmp_path / "body.json").write_bytes(BODY)
    env = {"TS": str(TS), "SHOP_SIGNING_SECRET": SECRET, "PATH": "/usr/bin:/bin"}
    shell = subprocess.run(["bash", "-c", recipe[0] + '\nprintf "%s" "$SIG"'], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True, timeout=60)
    result = runner.invoke(app, ["webhook", "sign", "--secret-env", "SHOP_SIGNING_SECRET", "--timestamp", str(TS),
                                 str(tmp_path / "body.json")], env={"SHOP_SIGNING_SECRET": SECRET})
    assert result.exit_code == 0, result.output
    assert shell.stdout == hexmac(SECRET, f"{TS}.".encode() + BODY)
    assert headers_of(result.stdout)["X-LangOrch-Signature"] == f"sha256={shell.stdout}"


@pytest.mark.parametrize(("args", "env", "message"), [
    (["BODY"], {}, "a secret is needed: --secret-env VAR or --secret-file FILE"),
    (["--secret-env", "NOPE_NOT_SET", "BODY"], {}, "--secret-env NOPE_NOT_SET: the environment variable is not set"),
    (["--secret-env", "EMPTY", "BODY"], {"EMPTY": ""}, "--secret-env EMPTY: the environment variable is empty"),
    (["--secret-file", "MISSING", "BODY"], {}, "--secret-file MISSING: cannot read it"),
    (["--secret-env", "S", "--scheme", "body", "--timestamp", "5", "BODY"], {"S": "x"},
     "--timestamp applies to the timestamped scheme only"),
    (["--secret-env", "S", "--url", "ftp://host/x", "BODY"], {"S": "x"},
     "--url ftp://host/x: expected an http:// or https:// URL"),
    (["--secret-env", "S", "MISSING"], {"S": "x"}, "cannot read MISSING"),
])
def test_usage_errors_exit_2(tmp_path: Path, body_file: Path, args, env, message) -> None:
    resolved = [str(body_file) if a == "BODY" else str(tmp_path / "missing") if a == "MISSING" else a for a in args]
    message = message.replace("MISSING", str(tmp_path / "missing"))
    result = runner.invoke(app, ["webhook", "sign", *resolved], env={"NOPE_NOT_SET": None, **env})
    assert result.exit_code == 2, result.output
    assert f"error: {message}" in result.stderr
    assert "Traceback" not in result.output


def test_empty_secret_file_and_bad_scheme(tmp_path: Path, body_file: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    result = runner.invoke(app, ["webhook", "sign", "--secret-file", str(empty), str(body_file)])
    assert result.exit_code == 2
    assert f"--secret-file {empty}: the file is empty" in result.stderr
    result = runner.invoke(app, ["webhook", "sign", "--secret-file", str(empty), "--scheme", "md5", str(body_file)])
    assert result.exit_code == 2
    assert "md5" in result.stderr


def test_the_docs_python_snippet_signs_what_the_gateway_verifies() -> None:
    page = (Path(__file__).parents[1] / "docs" / "operations" / "webhooks-signing.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    assert len(blocks) == 1
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], "webhooks-signing.md", "exec"), namespace)
    headers = namespace["langorch_headers"](SECRET.encode(), BODY)  # type: ignore[operator]
    assert verify_signature(SECRET, BODY, headers).ok
    ts = int(headers["X-LangOrch-Timestamp"])
    assert headers["X-LangOrch-Signature"] == "sha256=" + hexmac(SECRET, f"{ts}.".encode() + BODY)
