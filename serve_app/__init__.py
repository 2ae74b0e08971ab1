"""The Serve application: config, HTTP schema, ingress and the builder (`serve_app.app:build_app`)."""
