"""``BlockEventLog``: numbered events, a cursor per reader, and a snapshot for a reader that
fell out of the log."""
import threading

import pytest

from kvstore.cache import BlockEvent, Tier
from workers.block_events import BlockEventLog


def event(i: int, stored: bool = True) -> BlockEvent:
    return BlockEvent(Tier.T0, stored, i.to_bytes(16, "big"))


def test_readers_keep_their_own_cursors():
    log = BlockEventLog(capacity=8)
    assert log.read(None) == (None, 0)  # a new reader starts from a snapshot
    for i in range(3):
        log.append(event(i))
    events, a = log.read(0)
    assert events == [event(0), event(1), event(2)] and a == 3
    assert log.read(1) == ([event(1), event(2)], 3)  # another reader, further on
    assert log.read(a) == ([], 3)
    log.append(event(0, stored=False))
    assert log.read(a) == ([event(0, stored=False)], 4)


def test_a_reader_that_fell_out_of_the_log_or_from_the_future_gets_no_events():
    log = BlockEventLog(capacity=4)
    for i in range(10):
        log.append(event(i))
    assert log.read(5) == (None, 10)  # events 5 were dropped: only 6..9 are kept
    assert log.read(6) == ([event(i) for i in range(6, 10)], 10)
    assert log.read(11) == (None, 10)  # a cursor past the end (another incarnation's)
    assert log.read(-1) == (None, 10)
    with pytest.raises(ValueError, match="capacity"):
        BlockEventLog(capacity=0)


def test_concurrent_appends_are_all_numbered():
    log = BlockEventLog(capacity=1 << 16)
    threads = [threading.Thread(target=lambda: [log.append(event(i)) for i in range(5000)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events, end = log.read(0)
    assert end == 20000 and len(events) == 20000
