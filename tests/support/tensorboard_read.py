"""Reads a run's TensorBoard event files with TensorBoard's own reader and prints every scalar
series as JSON: {tag: [[step, value], ...]}."""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

accumulator = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
accumulator.Reload()
print(json.dumps({
    tag: [[e.step, e.value] for e in accumulator.Scalars(tag)]
    for tag in accumulator.Tags()["scalars"]
}))
