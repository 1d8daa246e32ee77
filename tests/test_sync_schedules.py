"""Seeded schedules on the simulated network: writes everywhere, partitions, heals, drops and
duplicates; after healing every node must hold the same entries, tips and state.

A failing seed is named in the test ID and the assertion: replay it with
``scripts/test tests/test_sync_schedules.py -k 'seed_17]'``. The network's faults and the
schedule come from the seed; trio's own scheduling order is seeded too. (Entry IDs still
differ run to run, since keys, entropy and nonces come from the OS.)
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack

import pytest
import trio
import trio._core._run as trio_run
from trio.testing import MockClock

from dag import Instance, Permission, SigningKey, cid_from_text
from sync import Address
from tests.simnet import Node, sim_node, snapshot
from transports.memory import SimNetwork

SEEDS = 200
STEPS = 24


async def _run_schedule(seed: int) -> tuple[object, int, int]:
    rng = random.Random(seed)
    trio_run._r.seed(seed)
    count = rng.randint(3, 5)
    network = SimNetwork(seed, min_delay_s=0.001, max_delay_s=0.05)
    keys = [SigningKey(rng.randbytes(32)) for _ in range(count)]
    async with AsyncExitStack() as stack:
        nodes: list[Node] = []
        for i in range(count):
            node = await stack.enter_async_context(
                sim_node(network, f"n{i}", Instance.in_memory(keys[i]), default_interval_s=20, retry_attempts=6)
            )
            nodes.append(node)
        origin = nodes[0]
        db = origin.instance.create_database(name=f"seed-{seed}")
        with db.transaction() as txn:
            txn.settings().set_global(Permission.read())
            for key in keys[1:]:
                txn.settings().add_key(key.pubkey, Permission.write(10))
        for node in nodes[1:]:
            # Each joins through a random node that already holds the database.
            holders = [n for n in nodes if n.instance.has_database(db.id)]
            via = rng.choice(holders)
            await node.sync.sync_with_peer(Address("memory", via.name), db.id)
        written: set[str] = {db.tips()[0]}
        network.drop, network.duplicate = 0.05, 0.05
        for _step in range(STEPS):
            action = rng.random()
            if action < 0.6:
                node = rng.choice(nodes)
                replica = node.db(db.id)
                with replica.transaction() as txn:
                    kind = rng.random()
                    if kind < 0.5:
                        txn.doc("doc").set(f"k{rng.randint(0, 5)}", rng.randint(0, 1000))
                    elif kind < 0.6:
                        txn.doc("doc").delete(f"k{rng.randint(0, 5)}")
                    elif kind < 0.9:
                        txn.table("rows").insert({"by": node.name, "n": rng.randint(0, 9)})
                    else:
                        txn.doc("doc").update("nested", {f"x{rng.randint(0, 3)}": node.name})
                if txn.entry is not None:
                    written.add(txn.entry.id)
            elif action < 0.75:
                names = [n.name for n in nodes]
                rng.shuffle(names)
                cut = rng.randint(1, len(names) - 1)
                network.partition(names[:cut], names[cut:])
            elif action < 0.85:
                network.heal()
            await trio.sleep(rng.uniform(0, 3))
        network.heal()
        network.drop = network.duplicate = 0.0
        await trio.sleep(200)  # retries and periodic syncs (every 20 s) run their course
        for node in nodes:
            await node.sync.flush()
        expected = snapshot(origin.db(db.id))
        for node in nodes:
            replica = node.db(db.id)
            counts = replica.status_counts()
            assert counts["unverified"] == counts["failed"] == 0, f"seed {seed}: {node.name} has {counts}"
            missing = [e for e in written if replica.status_of(cid_from_text(e)) is None]
            assert not missing, f"seed {seed}: {node.name} lost {len(missing)} entries"
            assert snapshot(replica) == expected, f"seed {seed}: {node.name} diverged from n0"
        assert len(expected["tips"]) >= 1
        return network.stats, len(written), len(expected["tips"])


@pytest.mark.parametrize("seed", [pytest.param(seed, id=f"seed_{seed}") for seed in range(SEEDS)])
async def test_seeded_schedule_converges(seed: int, autojump_clock: MockClock) -> None:
    await _run_schedule(seed)
