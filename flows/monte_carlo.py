"""A Monte Carlo estimate of pi, one batch of random samples per task.

    python flows/monte_carlo.py
"""

from __future__ import annotations

import random

from prefect import flow, task

from prefect_raydog import RayDogTaskRunner


@task
def hits_in_circle(seed: int, samples: int) -> int:
    rng = random.Random(seed)
    return sum(rng.random() ** 2 + rng.random() ** 2 <= 1.0 for _ in range(samples))


@flow(task_runner=RayDogTaskRunner())
def estimate_pi(batches: int = 100, samples: int = 100_000) -> float:
    hits = hits_in_circle.map(range(batches), samples=samples).result()
    return 4.0 * sum(hits) / (batches * samples)


if __name__ == "__main__":
    print(f"pi is about {estimate_pi():.5f}")
