# Sourced by the GPU scripts beside it: the repository root, the carried packages on the path, $OUT, the commit
# the results are named by ($C; pass REV=, a copied tree may carry a stale HEAD), and the card's name.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export PYTHONPATH=$PWD:$PWD/.gpucarry${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-nbs/bench/out}; mkdir -p "$OUT"
C=${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo wt)}; export MOE_LIT_COMMIT=$C
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE "h100|h200|b200|a100" | tr A-Z a-z)
nvidia-smi --query-gpu=name --format=csv,noheader
# Nsight Compute (the ncu_*.sh scripts): the binary, and the sections every report of theirs reads
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
NCU_SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats
              --section WarpStateStats --section SchedulerStats)
