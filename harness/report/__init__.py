"""Eval suites, the comparison report, regression gates and run comparison."""
