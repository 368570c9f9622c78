"""What both command lines (`agent`, `fleet`) do with an error: one line on stderr saying what
failed and what to check, and a documented exit code. A traceback only with `--debug` (or
EDGE_AGENT_DEBUG=1), and for a bug.

    0    done
    1    done, and the answer is no (a deploy rejected or not done within --wait, a doctor check failed)
    2    a mistake in what was asked: arguments, a name, a config file, an input file
    3    the agent is not running (nothing answers on its control socket)
    4    a service did not answer or refused: the broker, S3 (endpoint, credentials, access, bucket)
    70   a bug: the traceback follows; please report it
    130  interrupted (Ctrl-C)"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from agent.errors import AgentError, DaemonNotRunning, Unreachable

EXIT_NO = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_UNREACHABLE = 4
EXIT_BUG = 70
EXIT_INTERRUPTED = 130
DEBUG_ENV = "EDGE_AGENT_DEBUG"

_S3_UNREACHABLE = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"}
_S3_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_S3_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}


def run(prog: str, command: Callable[[], int], debug: bool = False) -> int:
    """`command`'s exit code; an exception becomes one line and an exit code (see the table)."""
    try:
        return command()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        if debug or os.environ.get(DEBUG_ENV) == "1":
            raise
        known = explain(err)
        if known is None:
            traceback.print_exc()
            print(
                f"{prog}: internal error ({type(err).__name__}: {err}); this is a bug, please report it",
                file=sys.stderr,
            )
            return EXIT_BUG
        code, line = known
        print(f"{prog}: {_one_line(line)}", file=sys.stderr)
        return code


def explain(err: BaseException) -> tuple[int, str] | None:
    """(exit code, the line to print) for an error users meet; None for a bug."""
    if isinstance(err, DaemonNotRunning):
        return EXIT_NOT_RUNNING, str(err)
    if isinstance(err, Unreachable):
        return EXIT_UNREACHABLE, str(err)
    if isinstance(err, AgentError):
        return EXIT_USAGE, str(err)
    if type(err).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer"):
        return EXIT_UNREACHABLE, _s3(_root_cause(err))
    if isinstance(err, OSError):
        if err.filename is not None:
            return EXIT_USAGE, f"{err.filename}: {err.strerror or err}"
        return EXIT_UNREACHABLE, f"{err.strerror or err} (check the address in the config and the network)"
    return None


def _root_cause(err: BaseException) -> BaseException:
    """boto3's transfer errors (S3UploadFailedError) wrap botocore's, which say what happened."""
    cause = err.__cause__ or err.__context__
    while cause is not None and type(cause).__module__.split(".")[0] in ("boto3", "s3transfer"):
        cause = cause.__cause__ or cause.__context__
    return cause if cause is not None and type(cause).__module__.startswith("botocore") else err


def _s3(err: BaseException) -> str:
    """botocore's errors, read by name (botocore is imported only where S3 is used)."""
    name = type(err).__name__
    if name in _S3_UNREACHABLE:
        return f"the S3 endpoint does not answer: {err} (check s3.endpoint_url and that the S3 server runs)"
    if name in _S3_NO_CREDENTIALS:
        return (
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_SHARED_CREDENTIALS_FILE "
            f"(boto3's chain: environment, ~/.aws/credentials, instance role) ({err})"
        )
    response = getattr(err, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    operation = getattr(err, "operation_name", "") or "a request"
    if code in _S3_DENIED:
        return f"S3 refused {operation} ({code}): the credentials lack the permission (see docs/security.md)"
    if code == "NoSuchBucket":
        return f"S3 has no bucket {response.get('Error', {}).get('BucketName', '')!r} (check s3.bucket) ({operation})"
    return f"S3 {operation} failed: {err}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
