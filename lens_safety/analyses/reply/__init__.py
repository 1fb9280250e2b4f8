"""Along the reply: the residual stream read at every generated token.

* :mod:`.readouts` -- :class:`ReadoutBasis`, :func:`reply_readouts` -> :class:`ReplyReadouts` (refusal and
  harm direction, probe, lens refusal / affirmation mass per reply token);
* :mod:`.turns` -- :func:`reply_turns` -> :class:`TurnResult` (replies whose judged outcome changes along
  the reply, and the judge on a prefix vs the full reply);
* :mod:`.detection` -- :func:`early_detection` -> :class:`DetectionResult` (flag compliance with a harmful
  request from the first ``k`` reply tokens);
* :mod:`.figures` -- their figures and a circuitsvis view of a reply coloured by a readout.

The recording itself is :func:`~lens_safety.model.recording.record_generation`.
"""

from __future__ import annotations

from .detection import KS, DetectionResult, detection_features, early_detection
from .figures import detection_figure, readout_figure, reply_view, turns_figure
from .readouts import READOUTS, ReadoutBasis, ReplyReadouts, reply_lens_layers, reply_readouts, reply_record_spec
from .turns import PREFIXES, TurnResult, reply_turns

__all__ = ["READOUTS", "ReadoutBasis", "ReplyReadouts", "reply_readouts", "KS", "DetectionResult",
           "detection_features", "early_detection", "PREFIXES", "TurnResult", "reply_turns", "readout_figure",
           "reply_view", "turns_figure", "detection_figure", "reply_record_spec", "reply_lens_layers"]
