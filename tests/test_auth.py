"""Principals: the auth file, bearer authentication, token creation and the ownership rules."""

from __future__ import annotations

import hashlib
import hmac
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from orcd import auth
from orcd.auth import (
    ANONYMOUS,
    SYSTEM,
    AuthFile,
    Principal,
    add_token,
    can_see,
    is_admin,
)
from orcd.cli import main
from orcd.errors import ConfigError

from .conftest import LogCapture

ROOT = Path(__file__).resolve().parent.parent


def sha(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "auth"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_reads_principals_comments_and_blank_lines(tmp_path: Path) -> None:
    path = write(tmp_path, f"""# orcd principals

{sha("tok-alice")} alice user
   {sha("tok-ops")}\tops.team-1   admin   # the on-call
""")
    principals = AuthFile.load(path)
    assert principals.names() == ["alice", "ops.team-1"]
    assert principals.authenticate("Bearer tok-alice") == Principal("alice", "user")
    assert principals.authenticate("Bearer tok-ops") == Principal("ops.team-1", "admin")


def test_digest_hex_is_case_insensitive(tmp_path: Path) -> None:
    path = write(tmp_path, f"sha256:{hashlib.sha256(b'tok').hexdigest().upper()} alice user\n")
    assert AuthFile.load(path).authenticate("Bearer tok") == Principal("alice", "user")


BAD_FILES = [
    ("{d1} alice user\n{d2} alice admin\n", 2, "duplicate name 'alice' (first on line 1)"),
    ("{d1} alice user\n# x\n{d1} bob user\n", 3, "duplicate digest (first on line 1)"),
    ("{d1} alice root\n", 1, "unknown role 'root': expected user or admin"),
    ("{d1} alice Admin\n", 1, "unknown role 'Admin'"),
    ("sha256:abc alice user\n", 1, "bad digest"),
    ("md5:" + "0" * 64 + " alice user\n", 1, "bad digest"),
    ("{d1} alice\n", 1, "got 2 fields"),
    ("{d1} alice user extra\n", 1, "got 4 fields"),
    ("{d1} al/ice user\n", 1, "bad name 'al/ice'"),
    ("{d1} " + "a" * 65 + " user\n", 1, "bad name"),
    ("\n\n{d1} system admin\n", 3, "the name 'system' is reserved"),
    ("{d1} Anonymous user\n", 1, "the name 'Anonymous' is reserved"),
]


@pytest.mark.parametrize(("text", "line", "problem"), BAD_FILES)
def test_bad_file_is_one_line_naming_file_line_and_problem(
        tmp_path: Path, text: str, line: int, problem: str) -> None:
    path = write(tmp_path, text.format(d1=sha("one"), d2=sha("two")))
    with pytest.raises(ConfigError) as info:
        AuthFile.load(path)
    message = info.value.message
    assert message.startswith(f"{path}:{line}: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(("setup", "problem"), [
    ("missing", "auth file not found"),
    ("directory", "auth file is a directory"),
    ("binary", "not UTF-8"),
    ("empty", "no principals; add one with `orcd token add NAME"),
])
def test_unusable_file_is_one_line(tmp_path: Path, setup: str, problem: str) -> None:
    path = tmp_path / "auth"
    if setup == "directory":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif setup == "empty":
        path.write_text("# nobody yet\n\n")
    with pytest.raises(ConfigError) as info:
        AuthFile.load(path)
    assert info.value.message.startswith(f"{path}: ")
    assert problem in info.value.message


@pytest.mark.parametrize("header", [
    None, "", "Bearer", "Bearer ", "Basic dG9rOg==", "Bearer wrong-token", "Bearer tok-alice x",
    "Bearertok-alice", "Bearer tok-alice\n", "tok-alice", "Bearer tok-alicé",
])
def test_authenticate_rejects_missing_malformed_and_unknown(tmp_path: Path,
                                                            header: str | None) -> None:
    principals = AuthFile.load(write(tmp_path, f"{sha('tok-alice')} alice user\n"))
    assert principals.authenticate(header) is None


@pytest.mark.parametrize("header", ["Bearer tok-alice", "bearer tok-alice", "BEARER  tok-alice",
                                    "Bearer tok-alice "])
def test_authenticate_scheme_is_case_insensitive(tmp_path: Path, header: str) -> None:
    principals = AuthFile.load(write(tmp_path, f"{sha('tok-alice')} alice user\n"))
    assert principals.authenticate(header) == Principal("alice", "user")


@pytest.mark.parametrize("token", ["tok-0", "tok-4", "tok-9", "nobody"])
def test_authenticate_compares_every_entry_whichever_matches(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    """No early exit: the first, a middle, the last and no entry all cost ten comparisons."""
    lines = "".join(f"{sha(f'tok-{i}')} user{i} user\n" for i in range(10))
    principals = AuthFile.load(write(tmp_path, lines))
    compared: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(len(a))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    found = principals.authenticate(f"Bearer {token}")
    assert compared == [32] * 10
    assert found == (None if token == "nobody" else Principal(f"user{token[-1]}", "user"))


def test_add_token_creates_0600_file_with_digest_only(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    token = add_token(path, "alice")
    admin_token = add_token(path, "ops", admin=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 43 and token != admin_token
    text = path.read_text()
    assert token not in text and admin_token not in text
    assert text == f"{sha(token)} alice user\n{sha(admin_token)} ops admin\n"
    principals = AuthFile.load(path)
    assert principals.authenticate(f"Bearer {token}") == Principal("alice", "user")
    assert principals.authenticate(f"Bearer {admin_token}") == Principal("ops", "admin")


def test_add_token_appends_to_a_hand_written_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"# ours\n{sha('old')} alice user")  # no final newline
    path.chmod(0o640)
    token = add_token(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # an existing file keeps its mode
    principals = AuthFile.load(path)
    assert principals.names() == ["alice", "bob"]
    assert principals.authenticate(f"Bearer {token}") == Principal("bob", "user")


@pytest.mark.parametrize(("name", "problem"), [
    ("alice", "a principal named 'alice' already exists"),
    ("SYSTEM", "the name 'SYSTEM' is reserved"),
    ("a b", "bad name 'a b'"),
    ("", "bad name ''"),
])
def test_add_token_refuses_bad_names_and_leaves_the_file(tmp_path: Path, name: str,
                                                         problem: str) -> None:
    path = tmp_path / "auth"
    add_token(path, "alice")
    before = path.read_text()
    with pytest.raises(ConfigError, match=problem):
        add_token(path, name)
    assert path.read_text() == before


def test_add_token_refuses_to_append_to_a_broken_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"{sha('x')} alice root\n")
    with pytest.raises(ConfigError, match=":1: unknown role"):
        add_token(path, "bob")


def test_ownership_rules() -> None:
    alice, bob = Principal("alice", "user"), Principal("bob", "user")
    ops = Principal("ops", "admin")
    assert can_see(alice, "alice") and not can_see(alice, "bob") and not can_see(bob, "alice")
    assert can_see(ops, "alice") and can_see(ops, "system")
    assert not is_admin(alice) and is_admin(ops) and is_admin(SYSTEM)
    assert SYSTEM.name == "system" and ANONYMOUS.name == "anonymous"


def test_cli_token_add_prints_the_token_once_on_stdout(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], log_capture: LogCapture) -> None:
    path = tmp_path / "auth"
    assert main(["token", "add", "ops", "--admin", "--auth-file", str(path)]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert out == token + "\n"
    assert token not in err and "admin 'ops'" in err and "shown only once" in err
    assert token not in str(log_capture.lines())
    assert AuthFile.load(path).authenticate(f"Bearer {token}") == Principal("ops", "admin")

    assert main(["token", "add", "ops", "--auth-file", str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"orcd: error: {path}: a principal named 'ops' already exists\n"


def test_cli_token_add_takes_the_file_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "auth"
    env = {"ORCD_AUTH_FILE": str(path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "orcd", "token", "add", "alice"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert AuthFile.load(path).authenticate(f"Bearer {token}") == Principal("alice", "user")

    done = subprocess.run([sys.executable, "-m", "orcd", "token", "add", "bob"],
                          env={"PATH": "/usr/bin:/bin"}, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == ("orcd: error: no auth file: pass --auth-file PATH or set "
                           "ORCD_AUTH_FILE\n")
