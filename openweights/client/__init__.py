"""The openweights SDK: `OpenWeights` / `AsyncOpenWeights` and what they return."""

from openweights.client._client import AsyncOpenWeights, OpenWeights, signup
from openweights.client._errors import InvalidParamsError, WaitTimeoutError
from openweights.client._models import File, Run, Secret, Token, Worker
from openweights.client.custom_job import Jobs, register
from openweights.client.jobs import AsyncJob, Job

__all__ = [
    "AsyncJob",
    "AsyncOpenWeights",
    "File",
    "InvalidParamsError",
    "Job",
    "Jobs",
    "OpenWeights",
    "Run",
    "Secret",
    "Token",
    "WaitTimeoutError",
    "Worker",
    "register",
    "signup",
]
