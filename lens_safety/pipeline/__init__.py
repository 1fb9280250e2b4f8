"""The one-command run: stages, verdicts, the HTML report and the README writer."""
