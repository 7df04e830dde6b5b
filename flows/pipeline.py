"""A small data pipeline with dependencies between tasks: extract -> transform (mapped) -> load.

Upstream results travel to downstream tasks through Ray's object store, and a task only starts
once its upstream tasks have finished.

    python flows/pipeline.py
"""

from __future__ import annotations

from prefect import flow, task

from prefect_raydog import RayDogTaskRunner


@task
def extract(day: int) -> list[float]:
    return [float(day * 10 + hour) for hour in range(24)]


@task
def transform(readings: list[float]) -> dict[str, float]:
    return {"min": min(readings), "max": max(readings), "mean": sum(readings) / len(readings)}


@task
def load(summaries: list[dict[str, float]]) -> float:
    return max(summary["max"] for summary in summaries)


@flow(task_runner=RayDogTaskRunner())
def pipeline(days: int = 30) -> float:
    raw = extract.map(range(days))
    summaries = transform.map(raw)
    peak = load.submit(summaries)
    return peak.result()


if __name__ == "__main__":
    print(f"peak reading: {pipeline()}")
