"""The reward server: any reward config served over HTTP (JSON in, JSON out, nothing unpickled).

    options.py      the server's settings, typed and bounded (ServerOptions)
    connections.py  the connection cap (503 without a thread) and per-request read deadlines
    requests.py     a /score body -> images (PIL, PNG/JPEG only, pixel limits) and prompts; the answer
    batcher.py      merges concurrent requests into reward calls of up to max_batch images; the
                    per-reward timeout and state (ok / stuck / dead)
    handler.py      the HTTP handler: /health, /score[/<name>], budgets, deadlines
    server.py       config composition, binding, `start` (build the rewards, listen)

The command is `python -m rlcm_exp.reward_server` (rlcm_exp/reward_server.py: arguments and exit
codes only); the client is rlcm_exp/rewards/remote.py (`reward=remote`).
"""
