"""What `trio_bg.testing`, the integrations' test clients and the pytest plugin use."""
