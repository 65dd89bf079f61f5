/** The README model card written beside merged weights (SPEC §8). */
import type { Recipe } from '../recipe/index.js';
import type { MethodSpec } from './methods.js';

function yamlString(s: string): string {
  return JSON.stringify(s);
}

export function modelCard(recipe: Recipe, method: MethodSpec, recipeText: string, version: string): string {
  const models = recipe.models.map((m) => `- ${m.model}`).join('\n');
  return `---
base_model: ${yamlString(recipe.baseModel.model)}
library_name: transformers
tags:
- merge
- della-merge
---
# Merged model

This model was merged with [della-merge](https://www.npmjs.com/package/della-merge) ${version}
using the **${method.name}** method (${method.paper}).

## Base model

- ${recipe.baseModel.model}

## Models merged

${models}

## Recipe

\`\`\`yaml
${recipeText.trimEnd()}
\`\`\`
`;
}
