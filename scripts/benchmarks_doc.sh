#!/usr/bin/env bash
# Regenerates docs/BENCHMARKS.md from the bench stores under bench/ (gitignored: they are the outputs of the
# commands listed below, each with its session). Run from the repository root after the bench runs:
#   bash scripts/benchmarks_doc.sh
set -euo pipefail
cd "$(dirname "$0")/.."
"${PYTHON:-.venv/bin/python}" scripts/benchmarks.py --store bench/cifar_cpu_first --store bench/attack_table_c500 --store bench/pgrl_cifar --store bench/gssd_cifar --store bench/pgbd_cifar --store bench/vibe_cifar --speed bench/speed.json \
 --command "bdseal bench bench=cifar_cpu defenses=[none] attacks=[badnets] seeds=[0] train.epochs=8 out=bench/cifar_cpu_first" \
 --command "bdseal bench bench=attacks_cifar   # run in session 2 as one bdseal run per attack at this scale, then: bdseal bench out=bench/attack_table_c500 ingest=runs/attack_table_c500" \
 --command "bdseal bench bench=pgrl_cifar 'attacks=[badnets-0.05]' 'defenses=[none,pgrl]' model=small_half   # session 2; session 3 added 'bdseal bench bench=pgrl_cifar model=small_half' (stopped after the none cells)" \
 --command "bdseal bench bench=gssd_cifar 'attacks=[badnets]' 'defenses=[none,gssd]' model=small_half 'defense_overrides.gssd=[defense.backbone.arch=small_half,defense.backbone.epochs=15,defense.flow.epochs=20]'   # session 2 (robust-z rule); session 5: the same with 'attacks=[issba]' (loo rule)" \
 --command "bdseal bench bench=pgbd_cifar model=small_half   # session 3 (FT, NAD, M_B, Neural Cleanse); PGBD/NT-/ST-PGBD re-run in session 5 with the current default defense.train.augment=none, then prune=true moved the crop_flip rows to stale.sqlite; session 5 also: 'attacks=[iab]'" \
 --command "bdseal bench bench=vibe_cifar 'attacks=[wanet]' ; bdseal bench bench=vibe_cifar 'attacks=[adap_blend]'   # session 4, one process per attack; session 5 likewise 'attacks=[freq]', 'attacks=[lc]' (stopped after SS-F)" \
 --command "bdseal bench-speed part=loop out=bench/speed.json loop.batch_size=64 loop.n=256 loop.epochs=1 loop.repeats=3" \
 --note "Conditions: a 2-core CPU VM; the session-1 cell and the speed file were measured with ~7 other jobs running (load 20-30), the session-2/3 cells with 2-4 jobs sharing the 2 cores, so wall times are inflated 1.5-4x. Rows of one attack run at several scales are labelled 'attack [scale]'. Parts of each paper's matrix are still missing (see docs/<defense>.md). Session 4 (no GPU): the vibe_cifar wanet/adap_blend cells, two bench processes sharing the 2 cores with 1-2 other jobs." \
 --gpu-store bench/gpu/pgbd_gpu --gpu-store bench/gpu/pgrl_gpu --gpu-store bench/gpu/pgrl_cifar --gpu-store bench/gpu/gssd_cifar --gpu-store bench/gpu/vibe_cifar --gpu-store bench/gpu/vibe_nl \
 --gpu-speed bench/gpu/speed_loop.json --gpu-speed-command "bdseal bench-speed part=loop out=speed_loop.json loop.model=resnet18 loop.batch_size=128 loop.n=16384" \
 --gpu-command "python scripts/cifar_jpeg.py pack ../shared/data/cifar10.npz .gpudata/cifar10_q90.npz   # here; on the GPU machine: unpack to /tmp/cifar10.npz" \
 --gpu-command "bdseal bench bench=pgbd_gpu dataset.root=/tmp/cifar10.npz          # full scale, PreAct-ResNet-18: session 3, BadNets FT/NAD" \
 --gpu-command "bdseal bench bench=pgbd_gpu dataset.root=/tmp/cifar10.npz 'attacks=[badnets]' 'defenses=[pgbd,nt_pgbd,st_pgbd]'; bdseal bench bench=pgbd_gpu dataset.root=/tmp/cifar10.npz 'attacks=[blend]' 'defenses=[pgbd,ft,nad,nt_pgbd,st_pgbd]'   # session 5 (D_S not augmented); then prune=true moved the crop_flip rows to stale.sqlite; session 5 also: 'attacks=[iab]'" \
 --gpu-command "bdseal bench bench=pgrl_gpu dataset.root=/tmp/cifar10.npz          # full scale, ResNet-18 (only the none cell finished in the call)" \
 --gpu-command "P=defense.train.epochs=12,defense.warmup_epochs=1,defense.weight_start=2,defense.weight_every=1,defense.n_weak=1,defense.n_strong=2,defense.clean_per_class=10,defense.train.batch_size=192,defense.umap_parallel=true; bdseal bench bench=pgrl_cifar dataset.root=/tmp/cifar10.npz \"defense_overrides.wce=[\$P]\" \"defense_overrides.pgrl=[\$P]\"   # reduced scale; none cells session 3, the 18 others session 5" \
 --gpu-command "bdseal bench bench=gssd_cifar dataset.root=/tmp/cifar10.npz        # reduced scale" \
 --gpu-command "bdseal bench bench=vibe_cifar dataset.root=/tmp/cifar10.npz        # reduced scale: the none cells (the VIBE cells failed: igraph wheel not carried)" \
 --gpu-command "bdseal bench bench=vibe_cifar dataset.root=/tmp/cifar10.npz defense.leiden=false 'defenses=[vibe_ss_a,vibe_ss_f]' 'attacks=[badnets,blend]' out=bench/vibe_nl   # VIBE without its Leiden filter" \
 --gpu-note "Sessions 3 and 5 each had one NVIDIA H100 80GB (torch 2.11.0+cu130 on the device image; bf16 autocast + channels_last) for 30 minutes of device time in 10-minute calls, so these are the cells that fitted. Data: the device call carries at most 64 MiB, so CIFAR-10 travelled as the JPEG-q90 copy of scripts/cifar_jpeg.py (all 50,000 training images, PSNR 42.5 dB against ../shared/data/cifar10.npz; test split = the first 500 images per class, so reduced-scale rows here use different test images than the CPU rows above). Full-scale rows: PreAct-ResNet-18 / ResNet-18 on all 47,500 non-held-out images; reduced-scale rows: the bench configs' CPU scale, run on the GPU." \
 --out docs/BENCHMARKS.md
