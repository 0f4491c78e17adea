// An outside client of `python -m drain_provider dev --anvil`, written with viem alone, as a web
// app or an agent would: read data/dev.json, approve + open a channel over the chain's JSON-RPC,
// sign a voucher with signTypedData, make one paid request. Prints one JSON line of results.
//
//   node tests/js/dev_client.mjs data/dev.json
import { readFileSync } from "node:fs";
import {
  createPublicClient,
  createWalletClient,
  defineChain,
  http,
  parseAbi,
  parseEventLogs,
} from "viem";
import { privateKeyToAccount } from "viem/accounts";

const dev = JSON.parse(readFileSync(process.argv[2], "utf8"));
const chain = defineChain({
  id: dev.chainId,
  name: "drain-provider dev",
  nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
  rpcUrls: { default: { http: [dev.rpcUrl] } },
});
const account = privateKeyToAccount(dev.consumer.privateKey);
const publicClient = createPublicClient({ chain, transport: http(dev.rpcUrl) });
const wallet = createWalletClient({ account, chain, transport: http(dev.rpcUrl) });

const erc20 = parseAbi(["function approve(address spender, uint256 amount) returns (bool)"]);
const drain = parseAbi([
  "function usdc() view returns (address)",
  "function open(address provider, uint256 amount, uint256 duration) returns (bytes32)",
  "event ChannelOpened(bytes32 indexed channelId, address indexed consumer, address indexed provider, uint256 deposit, uint256 expiry)",
]);

async function send(request) {
  const hash = await wallet.writeContract(request);
  const receipt = await publicClient.waitForTransactionReceipt({ hash });
  if (receipt.status !== "success") throw new Error(`${request.functionName} reverted`);
  return receipt;
}

const pricing = await (await fetch(`${dev.api}/pricing`)).json();
const contract = dev.contracts[0].address;
const token = await publicClient.readContract({ address: contract, abi: drain, functionName: "usdc" });
const deposit = 1_000_000n; // 1 USDC
await send({ address: token, abi: erc20, functionName: "approve", args: [contract, deposit] });
const opened = await send({
  address: contract,
  abi: drain,
  functionName: "open",
  args: [pricing.provider, deposit, BigInt(pricing.minChannelDurationSeconds + 3600)],
});
const [event] = parseEventLogs({ abi: drain, logs: opened.logs, eventName: "ChannelOpened" });
const channelId = event.args.channelId;

const amount = 200_000n; // cumulative: enough for the request's worst case
const nonce = 1n;
const signature = await wallet.signTypedData({
  domain: { name: "DrainChannel", version: "1", chainId: dev.chainId, verifyingContract: contract },
  types: {
    Voucher: [
      { name: "channelId", type: "bytes32" },
      { name: "amount", type: "uint256" },
      { name: "nonce", type: "uint256" },
    ],
  },
  primaryType: "Voucher",
  message: { channelId, amount, nonce },
});
const voucher = JSON.stringify({ channelId, amount: amount.toString(), nonce: nonce.toString(), signature });
const response = await fetch(`${dev.api}/chat/completions`, {
  method: "POST",
  headers: { "Content-Type": "application/json", "X-DRAIN-Voucher": voucher },
  body: JSON.stringify({
    model: Object.keys(pricing.models)[0],
    messages: [{ role: "user", content: "Hello from viem!" }],
    max_tokens: 50,
  }),
});
const answer = await response.json();
console.log(
  JSON.stringify({
    status: response.status,
    channelId,
    token,
    cost: response.headers.get("X-DRAIN-Cost"),
    total: response.headers.get("X-DRAIN-Total"),
    content: answer.choices?.[0]?.message?.content ?? null,
    error: answer.error ?? null,
  }),
);
process.exit(response.status === 200 ? 0 : 1);
