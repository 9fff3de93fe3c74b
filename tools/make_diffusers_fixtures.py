"""Reference fixtures for diffusers UNet2DModel folders (issue #26): small UNet2DModel configs
with random weights, saved by diffusers itself (`save_pretrained`: config.json +
diffusion_pytorch_model.safetensors, and a scheduler's scheduler_config.json), and the model's
forward pass on random inputs (`io.safetensors`: x, t, optional y, and out), which
tests/diffusers_unet.rs checks mcdm against at rel L2 <= 1e-4.

    /work/gdenv/bin/python tools/make_diffusers_fixtures.py --out tests/fixtures/diffusers
"""

import argparse
import os

import torch as th
from safetensors.torch import save_file

from diffusers import DDPMScheduler, UNet2DModel

# Each case: the UNet2DModel arguments, the scheduler's, and whether it is a pipeline folder
# (unet/ and scheduler/) or a plain model folder with scheduler_config.json beside.
CASES = {
    # guided-diffusion's layout: scale-shift norm, attention at the second level, class labels,
    # learned variance, cosine schedule.
    "attn_scale_shift_classes": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=32,
            resnet_time_scale_shift="scale_shift", num_class_embeds=10,
            # As in OpenAI's ADM conversions: without it a scale_shift mid block's attention has
            # no group norm, which guided-diffusion's always has.
            attn_norm_num_groups=32,
        ),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                       variance_type="learned_range", prediction_type="epsilon"),
        pipeline=False,
    ),
    # diffusers' defaults: plain time shift, several heads, two res blocks, three levels with
    # attention on the last two, a linear schedule, as a pipeline folder.
    "default_pipeline": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=16,
        ),
        # 100 steps (guided-diffusion's linear schedule scaled by 1000 / 100), as the sampling
        # fixtures' models, so that it composes with them.
        scheduler=dict(num_train_timesteps=100, beta_schedule="linear", beta_start=0.001,
                       beta_end=0.2, variance_type="fixed_small", prediction_type="epsilon"),
        pipeline=True,
    ),
    # Resnet up- and downsampling (guided-diffusion's resblock_updown), one head, no attention
    # below the middle block.
    "resnet_updown": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"), attention_head_dim=None,
            resnet_time_scale_shift="scale_shift", attn_norm_num_groups=32,
        ),
        scheduler=None,
        pipeline=False,
    ),
    # The layout of diffusers' DDPM checkpoints (google/ddpm-*): [sin | cos] time features with
    # freq_shift 1, group norms with eps 1e-6, attention at the second level, fixed_large variance.
    "ddpm_sin_first": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
            flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
        ),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_large"),
        pipeline=False,
    ),
    # Another group count (diffusers' norm_num_groups): groups of four channels at the first
    # level, eight at the second, in every norm, the mid-block attention's included.
    "groups_4": dict(
        unet=dict(
            sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=8,
            norm_num_groups=4,
        ),
        scheduler=dict(num_train_timesteps=1000, beta_schedule="linear", variance_type="fixed_small"),
        pipeline=False,
    ),
}


def randomize(model, seed):
    """Random weights of the scale a trained model has (not diffusers' zero inits)."""
    g = th.Generator().manual_seed(seed)
    with th.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            if name.endswith("bias"):
                p.copy_(0.1 * th.randn(p.shape, generator=g))
            elif "norm" in name and p.dim() == 1:
                p.copy_(1 + 0.1 * th.randn(p.shape, generator=g))
            else:
                p.copy_(th.randn(p.shape, generator=g) / fan_in**0.5)


def make(name, case, out, seed):
    th.manual_seed(seed)
    model = UNet2DModel(**case["unet"]).eval()
    randomize(model, seed)
    # Stored in f16 (small fixtures); the reference runs on the f16 values in f32.
    model = model.half().float()
    folder = os.path.join(out, name)
    unet_dir = os.path.join(folder, "unet") if case["pipeline"] else folder
    model.half().save_pretrained(unet_dir, safe_serialization=True)
    model.float()
    if case["scheduler"]:
        sched = DDPMScheduler(**case["scheduler"])
        sched.save_pretrained(os.path.join(folder, "scheduler") if case["pipeline"] else folder)
    g = th.Generator().manual_seed(seed + 1)
    n, size = 2, case["unet"]["sample_size"]
    x = th.randn(n, case["unet"]["in_channels"], size, size, generator=g)
    t = th.tensor([17.0, 803.0])
    kw = {}
    tensors = {"x": x, "t": t}
    if case["unet"].get("num_class_embeds"):
        y = th.tensor([3, 7])
        kw["class_labels"] = y
        tensors["y"] = y
    with th.no_grad():
        tensors["out"] = model(x, t, **kw).sample
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "io.safetensors"))
    print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {folder}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/fixtures/diffusers")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    th.set_num_threads(1)
    for i, (name, case) in enumerate(CASES.items()):
        make(name, case, args.out, args.seed + 10 * i)


if __name__ == "__main__":
    main()
