"""A two-sample inspect-ai task for the suite: needs no network and no dataset download."""

from inspect_ai import Task, task
from inspect_ai.dataset import Sample
from inspect_ai.scorer import includes
from inspect_ai.solver import generate


@task
def tiny_echo() -> Task:
    return Task(
        dataset=[
            Sample(input="Say apple.", target="apple"),
            Sample(input="Say river.", target="river"),
        ],
        solver=generate(),
        scorer=includes(),
    )
