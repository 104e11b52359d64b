"""An independent plain-Python re-derivation of the simulated clock and of a synchronous round's plan.

Written per client with Python floats and loops, the way the rules read (not vectorized, no binary search, an
event-driven walk for the round's end), for comparison with ``fedjax_lite.systems``. A client's task time is the
documented ``T_k(s) = D / down_k + (s * per_step_k + min(s * B, n_k) * per_example_k) + U / up_k``, summed in that
order, so the library's float64 values must equal these exactly.
"""

from __future__ import annotations

import math

import numpy as np

COUNTED, DISCARDED, TIMED_OUT, DROPPED_OUT = 0, 1, 2, 3


def task_time(systems, client, steps, num_examples, batch_size, download_bits, upload_bits):
  client = int(client)
  done = min(int(steps) * batch_size, int(num_examples))
  compute = int(steps) * float(systems.seconds_per_step[client]) + done * float(systems.seconds_per_example[client])
  return (download_bits / float(systems.download_bits_per_second[client]) + compute
          + upload_bits / float(systems.upload_bits_per_second[client]))


def steps_within(systems, client, seconds, full_steps, num_examples, batch_size, download_bits, upload_bits):
  """The largest ``s`` in ``[0, full_steps]`` with ``T(s) <= seconds`` by a linear scan, ``-1`` if none."""
  best = -1
  for steps in range(int(full_steps) + 1):
    if task_time(systems, client, steps, num_examples, batch_size, download_bits, upload_bits) <= seconds:
      best = steps
  return best


def windows_online_for(windows, client, time):
  """Seconds client ``client`` of ``AvailabilityWindows`` stays online from ``time``: its windows laid out over
  enough periods around ``time`` as absolute intervals, merged, then the one holding ``time``."""
  lo, hi = windows.offsets[client], windows.offsets[client + 1]
  pairs = list(zip(windows.starts[lo:hi].tolist(), windows.ends[lo:hi].tolist()))
  period = windows.period_seconds
  if period is None:
    intervals = pairs
  else:
    if any(end - start >= period for start, end in pairs):
      return math.inf
    first = int(time // period)
    intervals = [(start + n * period, end + n * period) for n in range(first - 1, first + 3) for start, end in pairs]
  intervals.sort()
  merged = []
  for start, end in intervals:
    if merged and start <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], end)
    else:
      merged.append([start, end])
  for start, end in merged:
    if start <= time < end:
      if period is not None and end >= (int(time // period) + 2) * period:
        return math.inf  # online through two whole periods: always online
      return end - time
  return 0.0


def plan(systems, clients, full_steps, num_examples, batch_size, download_bits, upload_bits, *, deadline,
         partial_work, min_steps, target, overhead, offline_fn):
  """``(status, steps, report, duration)`` per the rules; ``offline_fn(task_ends) -> offline times``."""
  num = len(clients)
  steps, report, timed_out, task_end = [], [], [], []
  for slot in range(num):
    args = (systems, clients[slot])
    full = int(full_steps[slot])
    if deadline is None:
      done, late = full, False
    else:
      fit = steps_within(*args, deadline, full, num_examples[slot], batch_size, download_bits, upload_bits)
      if partial_work:
        done, late = max(fit, 0), fit < min_steps
      else:
        done, late = full, fit < full
    time = task_time(*args, done, num_examples[slot], batch_size, download_bits, upload_bits)
    steps.append(done)
    report.append(time)
    timed_out.append(late)
    task_end.append(deadline if late else time)
  offline = offline_fn(np.asarray(task_end, np.float64))
  status = []
  for slot in range(num):
    if math.isfinite(offline[slot]):
      status.append(DROPPED_OUT)
    elif timed_out[slot]:
      status.append(TIMED_OUT)
    else:
      status.append(COUNTED)
  # The event-driven walk: reports in time order (ties by slot), every other outcome at its own time.
  events = []
  for slot in range(num):
    if status[slot] == COUNTED:
      events.append((report[slot], 0, slot))
    elif status[slot] == DROPPED_OUT:
      events.append((offline[slot], 1, slot))
    else:
      events.append((deadline, 1, slot))
  events.sort(key=lambda event: (event[0], event[2]))
  reports = 0
  end = None
  for time, kind, slot in events:
    if kind == 0:
      if target is not None and reports == target:
        status[slot] = DISCARDED
        continue
      reports += 1
      if target is not None and reports == target:
        end = time
  if end is None:
    end = max((event[0] for event in events), default=0.0)
    if deadline is not None:
      end = min(end, deadline)
  steps = [done if status[slot] in (COUNTED, DISCARDED) else 0 for slot, done in enumerate(steps)]
  report = [time if status[slot] in (COUNTED, DISCARDED) else math.inf for slot, time in enumerate(report)]
  return status, steps, report, end + overhead
