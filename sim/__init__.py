"""The simulator: synthetic users against mabrec's policy and the baselines (`mabrec simulate`)."""

POLICIES = ("mabrec", "original", "popularity", "epsilon-greedy", "ucb1", "random")
