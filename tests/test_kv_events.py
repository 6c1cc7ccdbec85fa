"""SubscribeKVEvents against a real `kvstore serve` (2 workers, Ray, Redis, the block store):
a snapshot, then every block stored per tier, and each tenant sees only its own."""
import asyncio

import grpc
import pytest
from serveprocess import start_serve, stop_serve
from servicehelpers import wait_for
from streams import Collected

from kvstore.cache import BlockEvent, Tier
from kvstore.client import SessionAPIError, SessionClient
from kvstore.v1 import session_pb2 as pb
from services.session.events import MAX_BEHIND, EventKind, KVEventHub, SubscriberBehind

KEYS = "sk-admin=*;sk-a=tenant-a;sk-b=tenant-b"
STORED = pb.KVEvent.BLOCK_STORED


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = start_serve(tmp_path_factory.mktemp("events"), "--workers", "2", api_keys=KEYS, always_load=True)
    yield served
    stop_serve(served)


class Subscriber(Collected):
    """One subscription's batches, collected on a thread."""

    def __init__(self, address: str, key: str, namespace: str = "") -> None:
        client = SessionClient(address, api_key=key)
        super().__init__(client.subscribe_kv_events(namespace), client.close)

    def events(self, snapshot: bool | None = None) -> list[pb.KVEvent]:
        return [e for b in list(self.messages) if snapshot is None or b.snapshot == snapshot for e in b.events]

    def hashes(self, worker: str, medium, namespace: str, snapshot: bool | None = False) -> set[bytes]:
        return {e.block_hash for e in self.events(snapshot) if e.kind == STORED and e.medium == medium
                and e.worker_id == worker and e.namespace == namespace}


def turn(kv: SessionClient, prompt: str, worker: str) -> pb.Usage:
    session = kv.create_session(system_prompt=prompt).session_id
    return kv.generate(session, tokens=[1], max_tokens=1, worker_id=worker).result().usage


def test_a_subscriber_sees_every_block_per_tier_and_nothing_of_another_tenant(served):
    with SessionClient(served.address, api_key="sk-a") as a, SessionClient(served.address, api_key="sk-b") as b:
        subs = {key: Subscriber(served.address, key) for key in ("sk-a", "sk-b", "sk-admin")}
        try:
            turn(a, "What tenant-a says first. " * 4, "w0")
            turn(b, "What tenant-b says first. " * 4, "w0")
            # Each subscription is live once it has its own namespace's first blocks (as they
            # happened, or in its snapshot if it started after them).
            assert wait_for(lambda: subs["sk-a"].hashes("w0", pb.MEDIUM_T0, "tenant-a", snapshot=None), 30)
            assert wait_for(lambda: subs["sk-b"].hashes("w0", pb.MEDIUM_T0, "tenant-b", snapshot=None), 30)
            assert wait_for(lambda: {e.namespace for e in subs["sk-admin"].events()} == {"tenant-a", "tenant-b"}, 30)
            prompt = "A conversation only tenant-a has, stored on w0, then read from T2 by w1. " * 6
            usage = turn(a, prompt, "w0")
            blocks = usage.prompt_tokens // 16
            sub = subs["sk-a"]
            assert wait_for(lambda: len(sub.hashes("w0", pb.MEDIUM_T2, "tenant-a")) >= blocks, 30)
            on_w0 = sub.hashes("w0", pb.MEDIUM_T0, "tenant-a")
            assert len(on_w0) >= blocks and sub.hashes("w0", pb.MEDIUM_T2, "tenant-a") <= on_w0
            assert turn(a, prompt, "w1").cached_tokens_t2 >= (blocks - 1) * 16
            # w1 fetched them from T2 into T1, then into T0: the same hashes, on w1, in both tiers.
            assert wait_for(lambda: len(sub.hashes("w1", pb.MEDIUM_T0, "tenant-a") & on_w0) >= blocks - 1, 30)
            on_w1 = sub.hashes("w1", pb.MEDIUM_T0, "tenant-a")
            assert len(sub.hashes("w1", pb.MEDIUM_T1, "tenant-a") & on_w0) >= blocks - 1
            stored = [e for e in sub.events(snapshot=False) if e.kind == STORED]
            assert all(len(e.token_ids) == 16 and e.parent_block_hash for e in stored)
            assert {e.namespace for e in sub.events()} == {"tenant-a"}
            assert {e.namespace for e in subs["sk-b"].events()} == {"tenant-b"}  # nothing of tenant-a
            assert on_w0 <= subs["sk-admin"].hashes("w0", pb.MEDIUM_T0, "tenant-a", snapshot=None)
            assert not any(s.error for s in subs.values()), [s.error for s in subs.values()]
            # A new subscriber starts from a snapshot of what the workers hold now.
            late = Subscriber(served.address, "sk-a")
            subs["late"] = late
            assert wait_for(lambda: on_w0 <= late.hashes("w0", pb.MEDIUM_T0, "tenant-a", snapshot=True), 30)
            assert on_w1 <= late.hashes("w1", pb.MEDIUM_T0, "tenant-a", snapshot=True)
            assert {e.namespace for e in late.events()} == {"tenant-a"}
        finally:
            for s in subs.values():
                s.close()


def test_blocks_gone_from_t2_reach_their_tenants_subscribers(served):
    """The block store's Redis reports T2 removals (here an admin flush's deletes; evictions and
    expiries alike: tests/test_blockstore_removals.py); no worker made them, so no worker id."""
    with SessionClient(served.address, api_key="sk-a") as a, SessionClient(served.address, api_key="sk-admin") as admin:
        subs = {key: Subscriber(served.address, key) for key in ("sk-a", "sk-b")}
        try:
            usage = turn(a, "Blocks of tenant-a that an admin flushes from every tier. " * 6, "w0")
            sub = subs["sk-a"]
            assert wait_for(lambda: len(sub.hashes("w0", pb.MEDIUM_T2, "tenant-a")) >= usage.prompt_tokens // 16, 30)
            written = sub.hashes("w0", pb.MEDIUM_T2, "tenant-a")
            assert admin.flush_namespace("tenant-a").blocks_dropped[2] >= len(written)

            def removed_from_t2() -> set[bytes]:
                return {e.block_hash for e in sub.events(snapshot=False) if e.kind == pb.KVEvent.BLOCK_REMOVED
                        and e.medium == pb.MEDIUM_T2 and e.worker_id == "" and e.namespace == "tenant-a"}
            assert wait_for(lambda: written <= removed_from_t2(), 30)
            assert not [e for e in subs["sk-b"].events() if e.namespace == "tenant-a"]
            assert not any(s.error for s in subs.values()), [s.error for s in subs.values()]
        finally:
            for s in subs.values():
                s.close()


def test_a_tenant_cannot_subscribe_to_another_namespace(served):
    sub = Subscriber(served.address, "sk-a", "tenant-b")
    try:
        assert wait_for(lambda: sub.error is not None, 30)
        assert isinstance(sub.error, SessionAPIError) and sub.error.code is grpc.StatusCode.PERMISSION_DENIED
    finally:
        sub.close()


def test_the_hub_ends_a_subscriber_that_falls_behind_and_tells_every_tenant_of_a_cleared_worker():
    """KVEventHub alone: the snapshot does not count against MAX_BEHIND, live events do."""
    hub = KVEventHub()
    def block(i: int, ns: str = "a") -> BlockEvent:  # namespaces chain from different roots: hashes differ
        return BlockEvent(Tier.T0, True, ns.encode() + i.to_bytes(15, "big"), ns, b"p" * 16, (i,) * 16)

    hub.publish("w0", [block(i) for i in range(MAX_BEHIND + 10)])
    hub.publish("w0", [block(0, "b")])

    async def run():
        sub, other = hub.subscribe("a"), hub.subscribe("b")
        snapshot = await sub.next_batch()
        assert snapshot.snapshot and len(snapshot.events) == MAX_BEHIND + 10
        hub.cleared("w0")  # a worker's tiers emptied: every subscriber hears it
        for s in (sub, other):
            batch = await s.next_batch()
            if batch.snapshot:
                batch = await s.next_batch()
            assert [e.kind for e in batch.events] == [EventKind.CLEARED]
        hub.publish("w1", [block(i) for i in range(MAX_BEHIND)])  # just within
        hub.publish("w1", [block(0, "b")])  # not for it
        hub.publish("w1", [block(1)])  # one too many: it is ended after what it has
        assert len((await sub.next_batch()).events) == MAX_BEHIND
        with pytest.raises(SubscriberBehind, match="subscribe again"):
            await sub.next_batch()
        assert [e.block.namespace for e in (await other.next_batch()).events] == ["b"]
        sub.close()
        other.close()
        assert hub.subscribers == 0

    asyncio.run(run())
