"""What uses a trained model, or grades others': errors, the demo (web/ holds its page), predict, export, bench, and
the grader with its retraining."""
