"""Runs every grpcurl example of the given Markdown files against a live pgstore, in order, so the
documentation cannot drift from the API.

    python scripts/check_grpcurl_examples.py --addr 127.0.0.1:50051 README.md docs/api.md

Each `grpcurl ...` command in a ```sh block is taken as written (continuation lines and quoted
JSON spanning lines included), with `localhost:50051` replaced by --addr. A call must succeed;
when the next line is a `# {...}` comment, the answer must contain those fields and values.
Server-streaming calls (Subscribe, WatchChanges, Lock) must deliver a first message, then are
cancelled, as Ctrl-C would.

The real grpcurl binary is used when it is on PATH. Otherwise the commands are replayed the way
grpcurl runs them: the schema comes from the server's reflection service, the -d JSON is parsed
with protobuf's JSON mapping against it, -H headers become metadata. Examples that are meant to
fail are marked with a `# fails:` comment naming the status code on the line above them.
"""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

STREAM_WAIT = 10.0
# Pause after a streaming example ends, as a person would before typing the next command.
SETTLE = 1.0


def examples(path):
    """(line number, command text, expected JSON or None, expected failure code or None)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    out, in_sh, i = [], False, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            in_sh = line.strip() in ("```sh", "```bash", "```shell") and not in_sh
            i += 1
            continue
        if in_sh and line.lstrip().startswith("grpcurl "):
            start, text = i + 1, line
            while text.rstrip().endswith("\\") or not balanced(text):
                i += 1
                text += "\n" + lines[i]
            expected = None
            if i + 1 < len(lines) and lines[i + 1].lstrip().startswith("# {"):
                expected = json.loads(lines[i + 1].lstrip()[2:])
            fails = None
            prev = lines[start - 2] if start >= 2 else ""
            m = re.match(r"\s*# fails: ([A-Z_]+)", prev)
            if m:
                fails = m.group(1)
            out.append((start, text, expected, fails))
        i += 1
    return out


def balanced(text):
    try:
        shlex.split(text.replace("\\\n", " "))
        return True
    except ValueError:
        return False


def parse(text, addr):
    argv = shlex.split(text.replace("\\\n", " "))
    assert argv[0] == "grpcurl"
    opts = {"plaintext": False, "data": None, "headers": []}
    rest, j = [], 1
    while j < len(argv):
        a = argv[j]
        if a == "-plaintext":
            opts["plaintext"] = True
        elif a == "-d":
            j += 1
            opts["data"] = argv[j]
        elif a in ("-H", "-rpc-header", "-reflect-header"):
            j += 1
            opts["headers"].append(argv[j])
        elif a.startswith("-"):
            raise SystemExit(f"unsupported grpcurl flag in an example: {a}")
        else:
            rest.append(a.replace("localhost:50051", addr))
        j += 1
    return argv, opts, rest


class Replay:
    """grpcurl's behaviour, on grpcio and the server's reflection."""

    def __init__(self, addr):
        self.channel = grpc.insecure_channel(addr)
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)

    def run(self, opts, rest):
        target, *args = rest
        if args == ["list"]:
            services = self.db.get_services()
            assert "pgstore.v1.EventStore" in services, services
            return None
        if args[0] == "describe":
            name = args[1]
            try:
                self.pool.FindMessageTypeByName(name)
            except KeyError:
                self.pool.FindServiceByName(name)
            return None
        service_name, method_name = args[0].rsplit("/", 1)
        service = self.pool.FindServiceByName(service_name)
        method = service.methods_by_name[method_name]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = request_class()
        if opts["data"]:
            json_format.Parse(opts["data"], request)
        metadata = [tuple(x.strip() for x in h.split(":", 1)) for h in opts["headers"]]
        path = f"/{service_name}/{method_name}"
        kwargs = dict(request_serializer=lambda m: m.SerializeToString(),
                      response_deserializer=response_class.FromString)
        if method.server_streaming:
            call = self.channel.unary_stream(path, **kwargs)(request, metadata=metadata,
                                                             timeout=STREAM_WAIT)
            first = next(iter(call))
            call.cancel()
            # As after Ctrl-C, give the server a moment to see the call end (a Lock is released
            # when it does) before the next command.
            time.sleep(SETTLE)
            return json.loads(json_format.MessageToJson(first))
        response = self.channel.unary_unary(path, **kwargs)(request, metadata=metadata,
                                                            timeout=STREAM_WAIT)
        return json.loads(json_format.MessageToJson(response))


def run_grpcurl(argv, addr, streaming):
    argv = [a.replace("localhost:50051", addr) for a in argv]
    try:
        out = subprocess.run(argv, capture_output=True, text=True,
                             timeout=STREAM_WAIT if streaming else 30)
    except subprocess.TimeoutExpired as e:
        time.sleep(SETTLE)
        # A stream that was still open: it must have delivered something.
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        if not text.strip():
            raise AssertionError("the stream delivered nothing") from None
        return json.loads(text[: text.index("\n}") + 2])
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip())
    text = out.stdout.strip()
    if text.startswith("{"):
        return json.loads(text[: text.index("\n}") + 2]) if "\n}" in text else json.loads(text)
    return None


def contains(answer, expected):
    if isinstance(expected, dict):
        return isinstance(answer, dict) and all(
            k in answer and contains(answer[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        return isinstance(answer, list) and len(answer) == len(expected) and all(
            contains(a, e) for a, e in zip(answer, expected))
    return answer == expected


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", required=True)
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    use_grpcurl = shutil.which("grpcurl") is not None
    replay = None if use_grpcurl else Replay(args.addr)
    failures, count = 0, 0
    for path in args.files:
        for line, text, expected, fails in examples(path):
            count += 1
            argv, opts, rest = parse(text, args.addr)
            streaming = any(m in text for m in ("/Subscribe", "/WatchChanges", "/Lock"))
            where = f"{path}:{line}"
            try:
                if use_grpcurl:
                    answer = run_grpcurl(argv, args.addr, streaming)
                else:
                    answer = replay.run(opts, rest)
                if fails:
                    raise AssertionError(f"expected {fails}, the call succeeded")
                if expected is not None and not contains(answer, expected):
                    raise AssertionError(f"answer {answer} lacks {expected}")
                print(f"ok   {where}: {' '.join(rest[1:])[:70]}")
            except grpc.RpcError as e:
                if fails and e.code().name == fails:
                    print(f"ok   {where}: fails with {fails} as documented")
                    continue
                failures += 1
                print(f"FAIL {where}: {e.code().name}: {e.details()}\n     {text}")
            except Exception as e:  # noqa: BLE001 - every failure is reported the same way
                failures += 1
                print(f"FAIL {where}: {e!r}\n     {text}")
    tool = "grpcurl" if use_grpcurl else "grpcurl replayed through reflection"
    print(f"{count - failures}/{count} grpcurl examples passed ({tool})")
    if count == 0:
        print("no grpcurl examples found")
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
