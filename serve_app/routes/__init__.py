"""The HTTP API, one router per resource: images, video, streams, pipeline and health."""
