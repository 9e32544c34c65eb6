cd /work/main
D=~/ooc-runs/dist-atari
FLAGS="--games pong --steps_per_game 6144 --baseline dense --num_experts 32 --expert_dim 64 --expert_hidden_dim 128 --context_len 4 --hbm_capacity 4 --dram_capacity 8 --eval_episodes 1 --eval_max_steps 50"
rm -rf $D/dense-one $D/dense-two
/usr/bin/time -v -o $D/dense-one.time env OMP_NUM_THREADS=1 .venv/bin/python -m ooc_moe train-atari $FLAGS --out $D/dense-one > $D/dense-one.log 2>&1
/usr/bin/time -v -o $D/dense-two.time env OMP_NUM_THREADS=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 -m ooc_moe train-atari $FLAGS --out $D/dense-two > $D/dense-two.log 2>&1
for d in dense-one dense-two; do .venv/bin/python -c "
import json; m=json.load(open('$D/$d/metrics.json')); print('$d', m['world'], round(m['sps'],1), [round(h['charts/SPS']) for h in m['history']])"; grep -E "Percent of CPU|Elapsed" $D/$d.time; done
