"""pgstore from Python: the everyday flows, each checked against a live server.

    python example.py [--addr localhost:50051] [--token TOKEN]

Exits 0 when every flow behaved as documented, 1 otherwise.
"""

import argparse
import collections
import json
import os
import sys
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "generated"))
from pgstore.v1 import eventstore_pb2 as pb  # noqa: E402
from pgstore.v1 import eventstore_pb2_grpc as pb_grpc  # noqa: E402


def event(event_type, payload, **metadata):
    return pb.EventData(event_type=event_type, json=json.dumps(payload), metadata=metadata)


def append_with_optimistic_concurrency(store, stream):
    """Create a stream, append at an exact version, retry with an idempotency key."""
    created = store.Append(pb.AppendRequest(
        stream_id=stream, no_stream=True,
        events=[event("OrderPlaced", {"total": 42}, correlation_id="c-1")]))
    assert created.version == 1, created
    key = f"ship-{stream}"
    shipped = store.Append(pb.AppendRequest(
        stream_id=stream, exact=1, idempotency_key=key,
        events=[event("OrderShipped", {"carrier": "dhl"})]))
    assert shipped.version == 2 and not shipped.duplicate, shipped
    # The client timed out and retries: same key, nothing written twice.
    retried = store.Append(pb.AppendRequest(
        stream_id=stream, exact=1, idempotency_key=key,
        events=[event("OrderShipped", {"carrier": "dhl"})]))
    assert retried.duplicate and retried.last_sequence == shipped.last_sequence, retried
    print(f"append: {stream} at version {shipped.version}, retry was a duplicate")
    return shipped.last_sequence


def conflict_details(store, stream):
    """A stale expected version is ABORTED with a google.rpc.ErrorInfo saying what was found."""
    try:
        store.Append(pb.AppendRequest(stream_id=stream, exact=1,
                                      events=[event("OrderCancelled", {})]))
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.ABORTED, err.code()
        status = rpc_status.from_call(err)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                assert info.reason == "WRONG_EXPECTED_VERSION", info
                assert info.metadata["actual_version"] == "2", info
                print(f"conflict: {info.reason} expected {info.metadata['expected_version']},"
                      f" stream is at {info.metadata['actual_version']}")
                return
        raise AssertionError("no ErrorInfo in the status details")
    raise AssertionError("the stale append was accepted")


def load(store, stream, fence):
    """Read a stream, with the read-your-writes fence from the append."""
    page = store.Load(pb.LoadRequest(stream_id=stream, min_sequence=fence))
    types = [e.event_type for e in page.events]
    assert types == ["OrderPlaced", "OrderShipped"], types
    assert json.loads(page.events[0].json) == {"total": 42}
    assert page.events[0].metadata["correlation_id"] == "c-1"
    print(f"load: {stream} -> {types}")


def read_all_pages(store, prefix):
    """Page through the global log, two events at a time."""
    seen, sequence = [], 1
    while True:
        page = store.ReadFrom(pb.ReadFromRequest(from_sequence=sequence, limit=2,
                                                 stream_prefix=prefix))
        seen += [e.global_sequence for e in page.events]
        sequence = page.next_sequence
        if sequence > page.head:  # an empty page below the head is not the end
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen)), seen
    print(f"read_from: {len(seen)} events under {prefix!r}, in order")
    return seen


def subscribe_with_checkpoint(store, prefix):
    """Process some events, checkpoint, disconnect; resume after the checkpoint."""
    consumer = f"py-{uuid.uuid4().hex[:8]}"
    call = store.Subscribe(pb.SubscribeRequest(consumer_id=consumer, stream_prefix=prefix))
    first = []
    for message in call:
        if message.HasField("event"):
            first.append(message.event.global_sequence)
            if len(first) == 2:
                break
    call.cancel()
    store.SaveCheckpoint(pb.SaveCheckpointRequest(consumer_id=consumer, sequence=first[-1]))
    saved = store.LoadCheckpoint(pb.LoadCheckpointRequest(consumer_id=consumer))
    assert saved.found and saved.sequence == first[-1], saved

    call = store.Subscribe(pb.SubscribeRequest(consumer_id=consumer, stream_prefix=prefix))
    resumed = None
    for message in call:
        if message.HasField("event"):
            resumed = message.event.global_sequence
            break
    call.cancel()
    assert resumed is not None and resumed > first[-1], (first, resumed)
    print(f"subscribe: {consumer} processed {first}, resumed at {resumed}")


def consumer_group_member(store, prefix):
    """A group member gets its partitions, then events of those partitions; it checkpoints per
    partition as "<group>/<partition>"."""
    group = f"billing-{uuid.uuid4().hex[:8]}"
    call = store.Subscribe(pb.SubscribeRequest(group=group, member="worker-1",
                                               stream_prefix=prefix))
    owned, got = None, None
    for message in call:
        if message.HasField("assignment"):
            owned = set(message.assignment.partitions)
        elif message.HasField("event") and owned:
            got = message.event
            break
    call.cancel()
    assert got is not None and got.partition in owned, (owned, got)
    store.SaveCheckpoint(pb.SaveCheckpointRequest(
        consumer_id=f"{group}/{got.partition}", sequence=got.global_sequence))
    print(f"group: worker-1 owns {len(owned)} partitions, got #{got.global_sequence}"
          f" in partition {got.partition}")


def error_info(err):
    """The google.rpc.ErrorInfo of a failed call."""
    for detail in rpc_status.from_call(err).details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def reserve_seat(store, course, student, capacity):
    """A Dynamic Consistency Boundary decision: read the course's subscriptions by tag, decide,
    append conditioned on nothing about the course having changed since the read; on a conflict,
    decide again."""
    about_course = pb.Query(items=[pb.QueryItem(types=["StudentSubscribed"], tags=[course])])
    while True:
        read = store.Read(pb.ReadRequest(query=about_course))
        if len(read.events) >= capacity:
            return False
        try:
            store.Append(pb.AppendRequest(
                stream_id=f"{course}-{student}",
                events=[pb.EventData(event_type="StudentSubscribed", json="{}",
                                     tags=[course, student])],
                condition=pb.AppendCondition(fail_if_events_match=about_course,
                                             after_sequence=read.head)))
            return True
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise


def dcb_course_capacity(store, prefix):
    """Five students for two seats, the second decision taken on a stale read: never over-booked."""
    course = f"{prefix}course:1"
    taken = [reserve_seat(store, course, f"{prefix}student:{i}", capacity=2) for i in range(5)]
    assert taken == [True, True, False, False, False], taken
    # A decision on a read from before the course filled (it saw the first seat only) is
    # refused, not applied.
    about_course = pb.Query(items=[pb.QueryItem(types=["StudentSubscribed"], tags=[course])])
    first_seat = store.Read(pb.ReadRequest(query=about_course, limit=1)).head
    try:
        store.Append(pb.AppendRequest(
            stream_id=f"{course}-late",
            events=[pb.EventData(event_type="StudentSubscribed", json="{}", tags=[course])],
            condition=pb.AppendCondition(fail_if_events_match=about_course,
                                         after_sequence=first_seat)))
        raise AssertionError("a stale decision was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err
        info = error_info(err)
        assert info.reason == "APPEND_CONDITION_FAILED", info
    seats = store.Read(pb.ReadRequest(query=about_course))
    assert len(seats.events) == 2, seats
    print(f"dcb: {len(seats.events)} of 5 students got the 2 seats; a stale decision was refused")


def transfer(store, prefix):
    """Move money between two accounts with one MultiStreamAppend: both streams are written at
    the versions the decision read, or neither is."""
    a, b = f"{prefix}account-a", f"{prefix}account-b"
    opened = store.MultiStreamAppend(pb.MultiStreamAppendRequest(parts=[
        pb.AppendPart(stream_id=a, no_stream=True, events=[event("Deposited", {"amount": 10})]),
        pb.AppendPart(stream_id=b, no_stream=True, events=[event("Opened", {})]),
    ]))
    assert [p.version for p in opened.parts] == [1, 1], opened
    key = f"transfer-{prefix}1"
    request = pb.MultiStreamAppendRequest(idempotency_key=key, parts=[
        pb.AppendPart(stream_id=a, exact=1, events=[event("Debited", {"amount": 4})]),
        pb.AppendPart(stream_id=b, exact=1, events=[event("Credited", {"amount": 4})]),
    ])
    moved = store.MultiStreamAppend(request)
    assert moved.last_sequence == moved.first_sequence + 1, moved
    assert store.MultiStreamAppend(request).duplicate, "a retry with the key writes nothing"
    # A second transfer decided on the same (now stale) versions: refused, neither stream written.
    stale = pb.MultiStreamAppendRequest(parts=[
        pb.AppendPart(stream_id=a, exact=1, events=[event("Debited", {"amount": 4})]),
        pb.AppendPart(stream_id=b, exact=2, events=[event("Credited", {"amount": 4})]),
    ])
    try:
        store.MultiStreamAppend(stale)
        raise AssertionError("the stale transfer was accepted")
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.code()
        info = error_info(err)
        assert info.reason == "WRONG_EXPECTED_VERSION" and info.metadata["stream_id"] == a, info
    versions = [store.GetStream(pb.GetStreamRequest(stream_id=s)).version for s in (a, b)]
    assert versions == [2, 2], versions
    print(f"transfer: both accounts at version 2; the stale transfer was refused on {a}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", default="localhost:50051")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    channel = grpc.insecure_channel(args.addr)
    if args.token:
        # Tokens over plaintext only on a trusted network (or localhost): use TLS otherwise.
        channel = grpc.intercept_channel(channel, BearerToken(args.token))
    store = pb_grpc.EventStoreStub(channel)

    run = uuid.uuid4().hex[:8]
    prefix = f"py-{run}-"
    fence = append_with_optimistic_concurrency(store, f"{prefix}order-1")
    store.Append(pb.AppendRequest(stream_id=f"{prefix}order-2",
                                  events=[event("OrderPlaced", {"total": 7})]))
    conflict_details(store, f"{prefix}order-1")
    load(store, f"{prefix}order-1", fence)
    read_all_pages(store, prefix)
    subscribe_with_checkpoint(store, prefix)
    consumer_group_member(store, prefix)
    dcb_course_capacity(store, prefix)
    transfer(store, prefix)
    print("python example: all flows passed")


class CallDetails(
        collections.namedtuple("CallDetails", ("method", "timeout", "metadata", "credentials",
                                               "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call."""

    def __init__(self, token):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, d):
        metadata = list(d.metadata or []) + [self.header]
        return CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready,
                           d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)


if __name__ == "__main__":
    try:
        main()
    except (AssertionError, grpc.RpcError) as err:
        print(f"python example failed: {err!r}", file=sys.stderr)
        sys.exit(1)
