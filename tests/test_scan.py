"""`keystile scan` (docs/management.md): finds real keys in files, nothing else, and never
prints a key."""

from __future__ import annotations

import base64
import codecs
import importlib.util
import json
import marshal
import os
import random
import string
import subprocess
import sys
from collections.abc import Callable
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
    [
        '"{key}"',
        "\\n{key}\\n",
        "%22{key}%22",
        "x{key}",
        "key={key}&next",
        "{key}",
        "{key}x",
        "{key}9Zz",
        "{key}_suffix",
        "dev_{filler}{key}",
    ],
    ids=[
        "quoted",
        "escaped-newline",
        "url-encoded",
        "glued-before",
        "query",
        "bare",
        "glued-after-letter",
        "glued-after-letters-and-digits",
        "glued-after-underscore",
        "inside-a-look-alike",
    ],
)
def test_keys_inside_other_text_are_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str
) -> None:
    """A key is found whatever precedes or follows it (escape sequences, encodings, glued
    text, a look-alike it completes): its checksum tells where it ends."""
    key = generate_key("client_")
    # "dev_" and 29 characters, then "client": 33 characters, a dev_ look-alike ending
    # inside the key's prefix.
    filler = "Q" * (BODY_LENGTH + 6 - len("client"))
    write(tmp_path / "log.jsonl", template.format(key=key, filler=filler) + "\n")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{tmp_path / 'log.jsonl'}:1: {hint(key)}\n")


def test_binaries_are_searched_for_ascii_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A key in plain ASCII inside a binary is found, NUL bytes early or late."""
    key = generate_key("prod_")
    early = write(tmp_path / "image.png", b"\x89PNG\r\n\x1a\n\0\0" + key.encode() + b"\n")
    late = write(tmp_path / "late.bin", b"a" * 9000 + b"\n\0" + key.encode() + b"\n")
    code, out, _ = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{early}:3: {hint(key)}\n{late}:2: {hint(key)}\n")


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


# -- issue #18 item 11: keys in UTF-16, binaries and base64, and the links to skip ---------------


def _text(key: str) -> str:
    return f"# settings\r\nAPI_KEY={key}\r\n"


def _pyc(key: str) -> bytes:
    """A compiled module (as `python -m compileall` writes it) holding the key."""
    code = compile(f"API_KEY = {key!r}\n", "settings.py", "exec")
    return importlib.util.MAGIC_NUMBER + b"\0" * 12 + marshal.dumps(code)


def _b64(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


def _k8s_secret(key: str) -> bytes:
    value = _b64(key)
    return (
        f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: api\ndata:\n  key: {value}\n".encode()
    )


ENCODED: list[tuple[str, Callable[[str], bytes], int | None]] = [
    ("utf-16-le-bom", lambda k: codecs.BOM_UTF16_LE + _text(k).encode("utf-16-le"), 2),
    ("utf-16-le", lambda k: _text(k).encode("utf-16-le"), 2),
    ("utf-16-be-bom", lambda k: codecs.BOM_UTF16_BE + _text(k).encode("utf-16-be"), 2),
    ("utf-16-be", lambda k: _text(k).encode("utf-16-be"), 2),
    ("utf-16-non-ascii-text", lambda k: f"café\nclé: «{k}»\n".encode("utf-16-le"), 2),
    ("utf-16-glued", lambda k: f"x{k}y".encode("utf-16"), 1),
    ("pyc", _pyc, None),
    ("binary-key-at-odd-offset", lambda k: b"\0\x01\x02" + k.encode() + b"\0", None),
    ("kubernetes-secret", _k8s_secret, 6),
    ("base64-with-newline", lambda k: base64.b64encode(f"{k}\n".encode()), 1),
    (
        "base64-inside-a-blob",
        lambda k: b"blob: " + base64.b64encode(f"FOO=bar\nTOKEN={k}\nX=1\n".encode()),
        1,
    ),
    (
        "base64-url-safe-unpadded",
        lambda k: base64.urlsafe_b64encode(f"x{k}".encode()).rstrip(b"="),
        1,
    ),
    ("base64-in-json", lambda k: b'{"auth":"' + base64.b64encode(k.encode()) + b'"}', 1),
    (
        "base64-in-utf-16",
        lambda k: f"v: {base64.b64encode(k.encode()).decode()}".encode("utf-16"),
        1,
    ),
    ("glued-after", lambda k: f"token={k}abc\n".encode(), 1),
    ("glued-on-both-sides", lambda k: f"\n\nxx{k}9\n".encode(), 3),
]


@pytest.mark.parametrize("chunk", [scan_module.CHUNK_BYTES, 64], ids=["1MiB-chunks", "64B-chunks"])
@pytest.mark.parametrize(
    ("make", "line"), [(m, n) for _, m, n in ENCODED], ids=[name for name, _, _ in ENCODED]
)
def test_item11_keys_in_other_encodings_are_found(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[str], bytes],
    line: int | None,
    chunk: int,
) -> None:
    """A key in UTF-16 (either byte order, with or without a byte order mark), in a
    binary, base64-encoded, or glued to the text after it is found exactly once, on its
    line (a binary's line: its newline bytes before the key), also when the file is read
    in chunks that cut it."""
    monkeypatch.setattr(scan_module, "CHUNK_BYTES", chunk)
    key = generate_key("dev_")
    data = make(key)
    if line is None:
        line = data[: data.index(key.encode())].count(b"\n") + 1
    path = write(tmp_path / "leak", data)
    assert list(scan_paths([str(path)])) == [Finding(str(path), line, hint(key), "dev_")]


@pytest.mark.parametrize("chunk", [scan_module.CHUNK_BYTES, 64], ids=["1MiB-chunks", "64B-chunks"])
def test_item11_many_keys_across_chunks_are_each_found_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Keys spread over a file, plain and base64, each come out once with its own line,
    however the chunks fall."""
    monkeypatch.setattr(scan_module, "CHUNK_BYTES", chunk)
    found = [generate_key("prod_") for _ in range(20)]
    lines = []
    for number, key in enumerate(found):
        lines.append("x" * number)
        lines.append(key if number % 2 else base64.b64encode(key.encode()).decode())
    path = write(tmp_path / "many.txt", "\n".join(lines) + "\n")
    assert list(scan_paths([str(path)])) == [
        Finding(str(path), 2 * number + 2, hint(key), "prod_") for number, key in enumerate(found)
    ]


def test_item11_dangling_links_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Dangling links and loops of links are skipped, not reported: the scan of a tree
    holding them exits 0 when clean and 1 with a key, never 2."""
    (tmp_path / "gone").symlink_to(tmp_path / "missing")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "under-a-file").symlink_to(tmp_path / "clean.txt" / "x")
    write(tmp_path / "clean.txt", "nothing\n")
    assert run(capsys, str(tmp_path)) == (0, "", "")
    assert run(capsys, str(tmp_path / "gone")) == (0, "", "")
    key = generate_key("prod_")
    leak = write(tmp_path / "leak.txt", key)
    code, out, err = run(capsys, str(tmp_path))
    assert (code, out) == (1, f"{leak}:1: {hint(key)}\n")
    assert "cannot scan" not in err


def test_item11_no_false_positives_in_ordinary_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ordinary text, source, UTF-16, binaries and base64 — the package's own sources and
    a soup of look-alikes (every prefix followed by random base62, raw and encoded) —
    hold no finding."""
    rng = random.Random(18_11)
    alphabet = string.ascii_letters + string.digits

    def lookalike() -> str:
        prefix = rng.choice(["dev_", "prod_", "client_"])
        return prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(30, 40)))

    soup = "\n".join(f"{lookalike()}{lookalike()} {rng.random()}" for _ in range(2000))
    write(tmp_path / "soup.txt", soup)
    write(tmp_path / "soup16.txt", soup.encode("utf-16"))
    write(tmp_path / "soup.b64", base64.b64encode(soup.encode()))
    write(tmp_path / "random.bin", rng.randbytes(1 << 20))
    assert run(capsys, str(tmp_path), str(ROOT / "src"), str(ROOT / "README.md")) == (0, "", "")
