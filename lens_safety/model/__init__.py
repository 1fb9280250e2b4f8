"""Loading a chat model as a TransformerBridge (SafetyModel), and tiny random models for tests."""
