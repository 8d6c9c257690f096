"""dfbf from Python: one function per command, each the validated plan and the run that command uses.

    import dfbf_cli as dfbf

    run = dfbf.compress("yolo11n-pose.pt", flops=0.7, data="coco8-pose.yaml")
    run.report["models"]          # what report.json holds
    run.model.model               # the compressed nn.Module (``run.model`` is its adapter)

Every function checks all its arguments and inputs before any work, raises :class:`DfbfError` with the
sentence the CLI prints for the same mistake, and writes nothing half-done. ``on_progress`` receives one
:class:`ProgressEvent` per step of every long stage (the CLI draws them as bars).
"""

from dfbf_cli.api.runs import CompressRun, Evaluation, Exported, compress, evaluate, export
from dfbf_cli.api.stages import Finetuned, Pruned, finetune, prune, synthesize
from dfbf_cli.errors import DfbfError

__all__ = ["CompressRun", "DfbfError", "Evaluation", "Exported", "Finetuned", "Pruned", "compress", "evaluate", "export", "finetune", "prune",
           "synthesize"]
