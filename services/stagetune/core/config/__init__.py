"""SimpleTuner-compatible configuration: config.json and multidatabackend.json."""
