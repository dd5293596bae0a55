"""Learning from live traffic: `lightning-ray serve CONFIG --learn` (README "Learning from live traffic").

- `run.py`: `learn(cfg)`, the training loop of `train` over a live pool, with the live gateway as its runner.
- `desk.py` / `routes.py`: the live gateway's state and routes: live rollouts, their groups and extra samples,
  rewards posted later (`POST /rollouts/{id}/reward`) and the reward deadline.
- `pool.py`: the task pool whose groups come from traffic; `scorer.py`: what rewards the extra samples;
  `hooks.py`: `reward_hooks`, called once per rewarded live rollout with its policy version.
"""
