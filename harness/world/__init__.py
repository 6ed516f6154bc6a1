"""The digits world (a small SD-shaped world trained here) and `harness demo`."""
