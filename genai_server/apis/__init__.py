"""The other wire APIs clients speak, served by translation to and from chat completions: OpenAI's Responses API
(with its store of responses) and Anthropic's Messages API. Nothing here knows of HTTP: a handler hands a parsed
request in and gets a chat request out, and hands the chat answer in and gets this API's answer or events out.
"""
