"""Communication channels: compression of uploads and downloads with exact byte accounting (issue 19)."""
