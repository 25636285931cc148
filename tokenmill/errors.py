"""Error types. Every user-facing error is a ValueError subclass so callers can catch either."""


class TokenmillError(ValueError):
    """Base class of the errors tokenmill raises for bad input or unusable checkpoints."""


class InvalidParameterError(TokenmillError):
    """A request parameter is out of range; `param` names it (the server turns it into a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # pickled as it was built (a replica's refusal reaches the front so)
        return type(self), (self.param, self.message)


class UnknownOptionError(InvalidParameterError, TypeError):
    """An engine option no config declares (a typo): a TypeError, as Python raises for an unexpected
    keyword argument, and an InvalidParameterError naming it."""


class RequestFailedError(RuntimeError):
    """A request failed an engine step by itself (not bad input that checks could see); it was
    ended and the other requests went on."""


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or stopped answering: the engine cannot run another step (its
    message says what became of the worker processes)."""


class ModelLoadError(TokenmillError):
    """A model cannot be found or loaded (unknown path, pickle checkpoint, unsupported tensor type)."""


def require_unicode(param: str, text: str) -> None:
    """Text a tokenizer can take: JSON may carry lone UTF-16 surrogates ("\\ud800"), which no UTF-8
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidParameterError(param, f"the text holds a lone surrogate (\\u{ord(text[e.start]):04x}) at "
                                           f"character {e.start}: not valid Unicode") from None
