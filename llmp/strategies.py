"""Lightning's DeepSpeed strategy, also usable on CPU (gloo), so the ZeRO path is tested for real.

The stock ``DeepSpeedStrategy`` assumes CUDA in three places; on a CPU accelerator this class
lifts exactly those and otherwise defers to the stock code (GPU runs behave as stock):

1. ``setup_environment`` refuses any accelerator but CUDA;
2. ``setup_distributed`` validates CUDA device indices;
3. ``deepspeed.initialize`` gets ``device_rank = root_device.index``, which is ``None`` for the
   CPU device, and DeepSpeed compares it with 0.

Names registered with Lightning (usable as ``trainer.strategy`` in recipes and by
``fabric run --strategy deepspeed_stage_N``, which ``llmp fit`` maps onto these):
``llmp_deepspeed``, ``llmp_deepspeed_stage_2``, ``llmp_deepspeed_stage_3``,
``llmp_deepspeed_stage_2_offload``, ``llmp_deepspeed_stage_3_offload``.
"""

from __future__ import annotations

import argparse

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _StockDeepSpeed


class DeepSpeedStrategy(_StockDeepSpeed):
    """DeepSpeed ZeRO through Lightning, on CUDA (stock behaviour) or CPU (gloo).

    Example::

        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedStrategy(stage=3))
    """

    strategy_name = "llmp_deepspeed"

    @property
    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if self._on_cpu:
            DDPStrategy.setup_environment(self)  # the stock CUDA check is the only thing skipped
        else:
            super().setup_environment()

    def setup_distributed(self) -> None:
        if not self._on_cpu:
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()
        return None

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        if not self._on_cpu:
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    @classmethod
    def register_strategies(cls, registry) -> None:
        registry.register("llmp_deepspeed", cls, description="DeepSpeed (CPU or CUDA)")
        for stage in (2, 3):
            registry.register(f"llmp_deepspeed_stage_{stage}", cls, description=f"ZeRO-{stage}", stage=stage)
        registry.register(
            "llmp_deepspeed_stage_2_offload", cls, description="ZeRO-2 + CPU offload", stage=2, offload_optimizer=True
        )
        registry.register(
            "llmp_deepspeed_stage_3_offload",
            cls,
            description="ZeRO-3 + CPU offload",
            stage=3,
            offload_optimizer=True,
            offload_parameters=True,
        )


if "llmp_deepspeed" not in StrategyRegistry:
    DeepSpeedStrategy.register_strategies(StrategyRegistry)
