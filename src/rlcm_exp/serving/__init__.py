"""The reward server: any reward config served over HTTP (JSON in, JSON out, nothing unpickled).

    batcher.py  merges concurrent requests into reward calls of up to max_batch images
    server.py   options, config composition, the HTTP handler, `start` (build the reward, bind)

The command is `python -m rlcm_exp.reward_server` (rlcm_exp/reward_server.py: arguments and exit
codes only); the client is rlcm_exp/rewards/remote.py (`reward=remote`).
"""
