"""Property test: random lookup/load/allocate/commit/release/evict sequences against a model.

The model is what the engine knows: which sequences are running, which T0 slots each holds,
and what KV was committed under each hash (a function of the hash). After every step, no
block anywhere may differ from what was committed under its hash, pins must hold, and the
counters must add up.
"""
import pytest
from fakes import MemoryRemote
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from kvhelpers import SPEC, prefix, t0_holds, t1_holds, write_block

from kvstore.cache import CacheConfig, CacheFullError, Tier, TieredKVCache, WritePolicy

BS = SPEC.block_size
# A few shared "system prompts" so that sequences share prefixes and hit each other's blocks.
BASES = [[1] * 8, [1] * 4 + [2] * 4, [3] * 12]


class CacheMachine(RuleBasedStateMachine):
    @initialize(
        t0=st.integers(6, 12), t1=st.integers(1, 10),
        p01=st.sampled_from(list(WritePolicy)), p12=st.sampled_from(list(WritePolicy)),
        with_remote=st.booleans(),
    )
    def setup(self, t0, t1, p01, p12, with_remote):
        self.remote = MemoryRemote() if with_remote else None
        cfg = CacheConfig(t0_blocks=t0, t1_blocks=t1, t0_t1_policy=p01, t1_t2_policy=p12)
        self.cache = TieredKVCache(SPEC, cfg, remote=self.remote)
        self.running: list[tuple[object, list[int]]] = []  # (prefix, pinned block table)
        self.committed: set[bytes] = set()
        self.loaded = 0

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()

    @rule(base=st.integers(0, len(BASES) - 1), tail=st.lists(st.integers(0, 3), max_size=10))
    def run_sequence(self, base, tail):
        p = prefix(BASES[base] + tail)
        hit = self.cache.lookup(p)
        assert hit.num_tokens <= max(p.num_tokens - 1, 0)
        loaded = self.cache.load(p, hit)
        assert loaded.num_blocks <= hit.num_blocks
        for i, slot in enumerate(loaded.block_table):
            assert p.hashes[i] in self.committed
            assert t0_holds(self.cache, slot, p.hashes[i]), "loaded KV differs from the committed KV"
        self.loaded += loaded.num_blocks
        n_blocks = -(-p.num_tokens // BS)
        try:
            new = self.cache.allocate(n_blocks - loaded.num_blocks)
        except CacheFullError:
            self.cache.release(loaded.block_table)
            return
        table = loaded.block_table + new
        for i in range(loaded.num_blocks, n_blocks):
            if i < p.num_full_blocks:
                write_block(self.cache, table[i], p.hashes[i])
                self.cache.commit(p, i, table[i])
                self.committed.add(p.hashes[i])
        self.running.append((p, table))

    @precondition(lambda self: self.running)
    @rule(which=st.integers(0, 100))
    def finish_sequence(self, which):
        _, table = self.running.pop(which % len(self.running))
        self.cache.release(table)

    @rule(n=st.integers(1, 6))
    def pressure(self, n):
        """Another sequence's allocation: evicts (and spills) the LRU blocks."""
        try:
            slots = self.cache.allocate(n)
        except CacheFullError:
            return
        self.cache.release(slots)

    @invariant()
    def every_copy_matches_its_hash_and_pins_hold(self):
        if not hasattr(self, "cache"):
            return
        cache = self.cache
        cache.flush()
        cache.check_invariants()
        for p, table in self.running:  # pinned blocks of running sequences are untouched
            for i in range(p.num_full_blocks):
                assert t0_holds(cache, table[i], p.hashes[i])
        for h, slot in cache.cached_slots(Tier.T0).items():
            assert h in self.committed and t0_holds(cache, slot, h)
        for h, slot in cache.cached_slots(Tier.T1).items():
            assert h in self.committed and t1_holds(cache, slot, h)
        s = cache.stats()
        # After flush no background copy holds a pin: exactly the running sequences' slots.
        assert s.t0_in_use == len({slot for _, t in self.running for slot in t})
        assert s.t1_in_use == 0
        assert sum(s.loaded_blocks) == self.loaded
        assert s.t0_cached <= cache.config.t0_blocks and s.t1_cached <= cache.config.t1_blocks
        if self.remote is not None:
            assert {h for _, h in self.remote.blocks} <= self.committed


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_cache_model = CacheMachine.TestCase


def test_model_detects_a_broken_cache(monkeypatch):
    """The property test must fail when the cache serves wrong KV: break restore and check."""
    import kvstore.cache

    monkeypatch.setattr(kvstore.cache, "restore", lambda *a, **k: None)  # promote copies nothing
    machine = CacheMachine()
    machine.setup(t0=6, t1=8, p01=WritePolicy.WRITE_BACK, p12=WritePolicy.WRITE_THROUGH, with_remote=False)
    try:
        machine.run_sequence(0, [0, 0, 0, 0, 0])
        machine.finish_sequence(0)
        machine.pressure(6)  # spill everything to T1
        machine.cache.t0.kv.zero_()
        with pytest.raises(AssertionError, match="differs"):
            machine.run_sequence(0, [0, 0, 0, 0, 0])
    finally:
        machine.teardown()
