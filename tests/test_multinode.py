"""Two Ray nodes (``ray.cluster_utils.Cluster``), one decode worker on each: a session's turn 1
runs on node A, turn 2 is forced to node B, which finds the history in T2 (the shared block
store) and produces the same output as computing everything."""
from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster
from servicehelpers import LoopThread, reference, start_pool, start_server, worker_config

from kvstore.client import SessionClient
from services.blockstore.server import BlockStoreConfig, BlockStoreThread
from services.session.pool import PoolConfig


@pytest.fixture(scope="module")
def two_nodes(redis_server, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("RAY_TMPDIR", str(tmp_path_factory.mktemp("raytmp")))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node_a": 1}})
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    blockstore = BlockStoreThread(BlockStoreConfig(port=0, redis_url=redis_server.url))
    blockstore.start()
    loop = LoopThread()
    pool = start_pool(loop, PoolConfig(num_workers=2, worker=worker_config(blockstore.address, cost_aware=False),
                                       worker_resources=[{"node_a": 1}, {"node_b": 1}], name_prefix="multinode"))
    server = start_server(loop, pool, redis_server.url)
    yield pool, server
    loop.run(server.stop(grace=0))
    loop.run(pool.close())
    loop.close()
    blockstore.stop()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_turn_two_on_another_node_reuses_t2_with_identical_output(two_nodes):
    pool, server = two_nodes
    stats = {w: ray.get(pool.handle(w).stats.remote()) for w in pool.worker_ids}
    node_ids = {w: ray.get(pool.handle(w).__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                for w in pool.worker_ids}
    assert len(set(node_ids.values())) == 2, node_ids  # one worker per node
    assert all(s.alive for s in stats.values())
    with SessionClient(server.address, api_key="key-a") as kv:
        s = kv.create_session(system_prompt="You are a research agent on a two-node cluster. " * 3)
        g1 = kv.generate(s.session_id, messages=[{"role": "user", "content": "turn one"}], max_tokens=8,
                         ignore_eos=True, worker_id="w0").result()
        ray.get(pool.handle("w0").flush.remote())  # T2 writes are asynchronous: let them land
        g2 = kv.generate(s.session_id, messages=[{"role": "user", "content": "turn two"}], max_tokens=8,
                         ignore_eos=True, worker_id="w1").result()
        tokens = list(kv.get_session(s.session_id, include_tokens=True).token_ids)
    assert g1.usage.worker_id == "w0" and g2.usage.worker_id == "w1"
    p1, p2 = tokens[:g1.usage.prompt_tokens], tokens[:g2.usage.prompt_tokens]
    assert g1.ids == reference(p1, 8) and g2.ids == reference(p2, 8)
    # Everything turn 1 committed (its prompt and output, in full blocks) came from T2 on node B.
    committed = (g1.usage.prompt_tokens + 8 - 1) // 4 * 4
    assert g2.usage.cached_tokens_t2 >= committed - 4 and g2.usage.cached_tokens_t0 == g2.usage.cached_tokens_t1 == 0
