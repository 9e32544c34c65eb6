set -x
cd /work/main
FLAGS="--games pong,breakout --steps_per_game 8192 --num_experts 32 --expert_dim 64 --expert_hidden_dim 128 --hbm_capacity 4 --dram_capacity 8 --context_len 4 --eval_episodes 2 --eval_max_steps 300 --checkpoint_every 2"
D=~/ooc-runs/dist-atari
OMP_NUM_THREADS=1 .venv/bin/python -m ooc_moe train-atari $FLAGS --hbm_capacity 8 --dram_capacity 16 --no-detector --out $D/one-rank > $D/one-rank.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 --max_restarts 1 -m ooc_moe train-atari $FLAGS --out $D/two-ranks > $D/two-ranks.log 2>&1 &
TR=$!
while ! .venv/bin/python -c "import json,sys; h=json.load(open('$D/two-ranks/metrics.json'))['history']; sys.exit(len(h)<5)" 2>/dev/null; do sleep 1; done
for c in $(cat /proc/$TR/task/$TR/children); do if tr '\0' '\n' < /proc/$c/environ | grep -qx RANK=1; then echo kill rank 1 pid $c at $(date); kill -9 $c; fi; done
wait $TR; echo rc=$?
