"""What several test modules share: tiny models, adapter helpers, the training app's config."""
