"""The Python client of headswap: `Client` and what its methods return or raise.

    from headswap import Client

    with Client("localhost:50051", token=...) as client:
        for prediction in client.classify("cat.jpg")[0]:
            print(prediction.label, prediction.score)
"""

from headswap.client.client import FINETUNE_OPTIONS, Client, FineTuneOptions
from headswap.client.connection import DEFAULT_TARGET, Connection
from headswap.client.errors import (AbortedError, AlreadyExistsError, CancelledError, ClientError, DataLossError,
                                    DeadlineExceededError, FailedPreconditionError, InternalError,
                                    InvalidArgumentError, NotFoundError, OutOfRangeError, PermissionDeniedError,
                                    ResourceExhaustedError, UnauthenticatedError, UnavailableError,
                                    UnimplementedError, UnknownError)
from headswap.client.results import (Classifications, ImagePredictions, Job, JobEvent, JobState, ModelInfo,
                                     Prediction, RankedImage, Ranking, RolloutStatus, Submission)

__all__ = [
    "DEFAULT_TARGET", "FINETUNE_OPTIONS", "Client", "Connection", "FineTuneOptions",
    "Classifications", "ImagePredictions", "Job", "JobEvent", "JobState", "ModelInfo", "Prediction",
    "RankedImage", "Ranking", "RolloutStatus", "Submission",
    "ClientError", "AbortedError", "AlreadyExistsError", "CancelledError", "DataLossError", "DeadlineExceededError",
    "FailedPreconditionError", "InternalError", "InvalidArgumentError", "NotFoundError", "OutOfRangeError",
    "PermissionDeniedError", "ResourceExhaustedError", "UnauthenticatedError", "UnavailableError",
    "UnimplementedError", "UnknownError",
]
