"""The RL math (pure tensor functions) and reward functions."""
