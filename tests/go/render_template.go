// Renders an Ollama Modelfile TEMPLATE with Go's own text/template (the engine Ollama runs templates
// with), for tests/test_ollama.py. Usage: render_template TEMPLATE_FILE < conversations.json
// Input: a JSON array of conversations, each an array of {"role", "content"}; output: a JSON array of
// the rendered prompts, in order.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

// Message holds the fields of Ollama's api.Message that a chat template reads.
type Message struct {
	Role    string
	Content string
}

// Values holds what Ollama hands a chat template: the conversation as .Messages.
type Values struct {
	Messages []Message
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	check(err)
	tmpl, err := template.New("TEMPLATE").Option("missingkey=error").Parse(string(text))
	check(err)
	var conversations [][]Message
	check(json.NewDecoder(os.Stdin).Decode(&conversations))
	rendered := []string{}
	for _, messages := range conversations {
		var out strings.Builder
		check(tmpl.Execute(&out, Values{Messages: messages}))
		rendered = append(rendered, out.String())
	}
	check(json.NewEncoder(os.Stdout).Encode(rendered))
}

func check(err error) {
	if err != nil {
		os.Stderr.WriteString(err.Error() + "\n")
		os.Exit(1)
	}
}
