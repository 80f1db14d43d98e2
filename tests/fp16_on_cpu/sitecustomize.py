"""Put this directory on PYTHONPATH to let DeepSpeed train in fp16 on the CPU.

DeepSpeed's CPU accelerator reports no fp16 support, so the fp16 paths (loss scaling, overflow skips,
DeepSpeed's FP16 optimizers) never run on a machine without a GPU. torch's CPU kernels do compute in
fp16, slowly: claiming support exercises exactly the code a GPU run takes, scaler and all.
"""

import contextlib
import sys

# DeepSpeed announces its accelerator on stdout; some child processes (py-cpuinfo's) parse their stdout.
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

CPU_Accelerator.is_fp16_supported = lambda self: True
