"""`keystile scan` (SPEC §8): finds real keys in files, nothing else, and never prints a key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keystile import generate_key
from keystile import scan as scan_module
from keystile.cli import main
from keystile.keys import BODY_LENGTH, checksum
from keystile.scan import Finding, ScanProblem, scan_paths

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``keystile scan ...`` in process: exit code, stdout, stderr."""
    code = main(["scan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hint(key: str) -> str:
    prefix = key[: key.index("_") + 1]
    return f"{prefix}...{key[-4:]}"


def with_checksum(head: str) -> str:
    return head + checksum(head)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_finds_keys_of_every_type_in_nested_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Keys of each type, in files folders deep, are reported as file:line: hint, and the
    scan exits 1."""
    dev, prod, client = (generate_key(p) for p in ("dev_", "prod_", "client_"))
    write(tmp_path / "app" / "settings.py", f'DEBUG = True\nAPI_KEY = "{prod}"\n')
    write(tmp_path / "deep" / "er" / "still" / "notes.md", f"try\n\n`{dev}` and {client}.\n")
    write(tmp_path / "clean.txt", "nothing here\n")
    code, out, err = run(capsys, str(tmp_path))
    assert code == 1
    assert out.splitlines() == [
        f"{tmp_path / 'app' / 'settings.py'}:2: {hint(prod)}",
        f"{tmp_path / 'deep' / 'er' / 'still' / 'notes.md'}:3: {hint(dev)}",
        f"{tmp_path / 'deep' / 'er' / 'still' / 'notes.md'}:3: {hint(client)}",
    ]
    assert "found 3 keys in 2 files" in err
    for key in (dev, prod, client):
        assert key not in out + err
        assert key[:-4] not in out + err


def test_the_default_path_is_the_current_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a path the scan walks the current folder, naming files relative to it."""
    key = generate_key("prod_")
    write(tmp_path / "src" / "config.toml", f"key = '{key}'\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys)
    assert (code, out) == (1, f"{os.path.join('src', 'config.toml')}:1: {hint(key)}\n")


def test_a_clean_tree_exits_0_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tree with no key exits 0 and prints nothing."""
    write(tmp_path / "a.py", "print('hello')\n")
    assert run(capsys, str(tmp_path)) == (0, "", "")


def _lookalikes() -> list[tuple[str, str]]:
    real = generate_key("prod_")
    body = real[len("prod_") :]
    swapped = "prod_" + body[:-1] + ("A" if body[-1] != "A" else "B")
    cases = [
        ("bad-checksum", swapped),
        ("swapped-case", "prod_" + body.swapcase()),
        ("truncated", real[:-1]),
        ("one-more-character", real + "x"),
        ("body-one-longer", with_checksum("prod_" + body[: BODY_LENGTH + 1].ljust(28, "Q"))),
        ("body-one-shorter", with_checksum("prod_" + body[: BODY_LENGTH - 1])),
        ("unknown-prefix", with_checksum("test_" + body[:BODY_LENGTH])),
        ("upper-case-prefix", "PROD_" + body),
        ("homoglyph-p", "р" + real[1:]),  # Cyrillic er
        ("homoglyph-e", "dеv_" + generate_key("dev_")[4:]),  # Cyrillic ie
        ("homoglyph-l", "cⅼient_" + generate_key("client_")[7:]),  # small roman numeral fifty
        ("homoglyph-underscore", "prod＿" + body),  # fullwidth low line
        ("fullwidth-digit", "prod_" + body[:10] + "１" + body[11:]),
        ("split-over-lines", real[:20] + "\n" + real[20:]),
        ("random-base62", "prod_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q"),
    ]
    return cases


LOOKALIKES = _lookalikes()


@pytest.mark.parametrize("text", [t for _, t in LOOKALIKES], ids=[n for n, _ in LOOKALIKES])
def test_lookalikes_are_not_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """Strings that only look like keys — bad checksums, wrong lengths, unknown or homoglyph
    prefixes — are not reported."""
    write(tmp_path / "file.txt", f"token = {text}\n")
    assert run(capsys, str(tmp_path)) == (0, "", "")


@pytest.mark.parametrize(
    "template",
    ['"{key}"', "\\n{key}\\n", "%22{key}%22", "x{key}", "key={key}&next", "{key}"],
    ids=["quoted", "escaped-newline", "url-encoded", "glued-before", "query", "bare"],
)
def test_keys_inside_other_text_are_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str
) -> None:
    """A key is found whatever precedes it (escape sequences, encodings, glued text)."""
    key = generate_key("client_")
    write(tmp_path / "log.jsonl", template.format(key=key) + "\n")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{tmp_path / 'log.jsonl'}:1: {hint(key)}\n")


def test_binaries_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A file with a NUL byte in its first 8 KB is skipped; a NUL further in is not."""
    key = generate_key("prod_")
    write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\0\0" + key.encode() + b"\n")
    late = write(tmp_path / "late.bin", b"a" * 9000 + b"\n\0" + key.encode() + b"\n")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{late}:2: {hint(key)}\n")


def test_git_folders_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Nothing under a .git folder is scanned, at any depth."""
    key = generate_key("prod_")
    write(tmp_path / ".git" / "config", key)
    write(tmp_path / "vendored" / "lib" / ".git" / "objects" / "pack", key)
    assert run(capsys, str(tmp_path)) == (0, "", "")


def test_other_encodings_of_ascii_text_are_scanned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key in a Latin-1 or UTF-8 file with non-ASCII text around it is found on its line."""
    key = generate_key("dev_")
    write(tmp_path / "latin1.txt", f"café\nclé: {key}\n".encode("latin-1"))
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{tmp_path / 'latin1.txt'}:2: {hint(key)}\n")


def test_symlink_loops_and_fifos_do_not_hang_the_scan(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Links to folders are not followed and special files are not read."""
    key = generate_key("prod_")
    write(tmp_path / "a" / "k.txt", key)
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(tmp_path / "a" / "pipe")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{tmp_path / 'a' / 'k.txt'}:1: {hint(key)}\n")


def test_files_named_one_by_one_are_scanned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Files given as arguments (as pre-commit passes them) are scanned, inside .git too."""
    key = generate_key("prod_")
    one = write(tmp_path / "one.txt", key)
    two = write(tmp_path / "two.txt", "clean")
    code, out, _ = run(capsys, str(one), str(two))
    assert (code, out) == (1, f"{one}:1: {hint(key)}\n")


def test_a_missing_path_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A path that does not exist is reported on stderr and the scan exits 2."""
    code, out, err = run(capsys, str(tmp_path / "nope"))
    assert (code, out) == (2, "")
    assert "no such file or directory" in err


def test_an_unreadable_file_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that cannot be read is named on stderr, and the scan exits 2 unless a key was
    found (then 1)."""
    write(tmp_path / "secret.txt", "x")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(scan_module, "open", refuse, raising=False)
    code, _, err = run(capsys, str(tmp_path))
    assert code == 2
    assert f"{tmp_path / 'secret.txt'}: Permission denied" in err


def test_json_output_lists_findings_without_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--json answers the findings (path, line, hint, prefix) and the problems; no key."""
    key = generate_key("client_")
    path = write(tmp_path / "x.js", f"\n\nconst k = '{key}';\n")
    code, out, _ = run(capsys, "--json", str(tmp_path))
    assert code == 1
    assert json.loads(out) == {
        "findings": [{"path": str(path), "line": 3, "hint": hint(key), "prefix": "client_"}],
        "problems": [],
    }
    assert key not in out


def test_custom_prefixes_can_be_added(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--prefix adds a custom key type's prefix; a malformed prefix is a usage error."""
    key = generate_key("sk_")
    write(tmp_path / "env", f"SK={key}\n")
    assert run(capsys, str(tmp_path))[0] == 0
    assert run(capsys, "--prefix", "sk_", str(tmp_path))[0] == 1
    code, _, err = run(capsys, "--prefix", "s k", str(tmp_path))
    assert code == 2 and "prefix" in err


def test_scan_paths_yields_findings_and_problems(tmp_path: Path) -> None:
    """The Python API yields a Finding per key and a ScanProblem per unreadable path; a
    finding's text is file:line: hint."""
    key = generate_key("dev_")
    path = write(tmp_path / "a.txt", f"{key} {key}\n")
    items = list(scan_paths([str(path), str(tmp_path / "missing")]))
    assert items[:2] == [Finding(str(path), 1, hint(key), "dev_")] * 2
    assert isinstance(items[2], ScanProblem)
    assert str(items[0]) == f"{path}:1: {hint(key)}"


def test_the_pre_commit_hook_runs_keystile_scan() -> None:
    """.pre-commit-hooks.yaml defines the keystile-scan hook as `keystile scan` in Python."""
    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert "- id: keystile-scan" in lines
    assert "entry: keystile scan" in lines
    assert "language: python" in lines


def test_the_hook_entry_refuses_a_commit_with_a_key(tmp_path: Path) -> None:
    """The hook's command, run on staged file names, exits 1 with a key and 0 without."""
    keystile = os.path.join(os.path.dirname(sys.executable), "keystile")
    key = generate_key("prod_")
    leaked = write(tmp_path / "leak.env", f"KEY={key}\n")
    clean = write(tmp_path / "ok.py", "x = 1\n")
    found = subprocess.run(
        [keystile, "scan", str(clean), str(leaked)], capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 1
    assert found.stdout == f"{leaked}:1: {hint(key)}\n"
    assert key not in found.stdout + found.stderr
    passed = subprocess.run([keystile, "scan", str(clean)], capture_output=True, timeout=60)
    assert passed.returncode == 0
